"""Training items and their padded tensor form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class TrainItem:
    """One sampled response with its group-normalised advantage."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    # The behaviour policy's log-prob of each response token, as vLLM sampled it.
    rollout_logprobs: list[float] | None = None


@dataclass
class Padded:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T-1], 1 where target t+1 is a response token
    advantages: torch.Tensor  # [B]
    rollout_logp: torch.Tensor  # [B, T-1], aligned with response_mask; NaN where unknown

    def to(self, device: torch.device | str) -> Padded:
        return Padded(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(items: list[TrainItem], pad_id: int) -> Padded:
    """Pack prompt+response sequences so logits[:, t] predict input_ids[:, t+1]."""
    width = max(len(it.prompt_ids) + len(it.response_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    resp = torch.zeros((len(items), width - 1), dtype=torch.float32)
    rollout = torch.full((len(items), width - 1), float("nan"))
    for i, it in enumerate(items):
        p, r = len(it.prompt_ids), len(it.response_ids)
        ids[i, : p + r] = torch.tensor(it.prompt_ids + it.response_ids)
        attn[i, : p + r] = 1
        resp[i, p - 1 : p + r - 1] = 1.0
        if it.rollout_logprobs is not None:
            rollout[i, p - 1 : p + r - 1] = torch.tensor(it.rollout_logprobs)
    adv = torch.tensor([it.advantage for it in items], dtype=torch.float32)
    return Padded(ids, attn, resp, adv, rollout)


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal shards (sizes differ by at most one)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
