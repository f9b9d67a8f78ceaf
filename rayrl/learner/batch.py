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


def length(item: TrainItem) -> int:
    """Sequence tokens of one item: what its row of a padded batch needs."""
    return len(item.prompt_ids) + len(item.response_ids)


def cut_by_tokens(items: list[TrainItem], budget: int) -> list[list[TrainItem]]:
    """Items sorted by length, cut so each micro-batch's padded size (its size x its longest
    item) stays within `budget` tokens; an item longer than the budget goes alone."""
    out: list[list[TrainItem]] = []
    for it in sorted(items, key=length):
        # Sorted ascending, so the newest item is the longest: padded size = (k + 1) x it.
        if out and (len(out[-1]) + 1) * length(it) <= budget:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def micro_batches(
    shards: list[list[TrainItem]], gas: int, budget: int
) -> list[list[list[TrainItem]]]:
    """Each rank's shard of one mini-batch as micro-batches, as many on every rank (ZeRO-2
    reduces gradients at every backward, so the ranks' backwards must pair up).

    budget 0: `gas` near-equal micro-batches in rollout order. budget > 0: `cut_by_tokens`;
    a rank with fewer micro-batches than the most splits its largest in two until it has as
    many, and pads with empty ones (a zero-loss forward) when it runs out of items.
    """
    if budget == 0:
        return [split_even(shard, gas) for shard in shards]
    cuts = [cut_by_tokens(shard, budget) for shard in shards]
    k = max(len(c) for c in cuts)
    for c in cuts:
        while len(c) < k and any(len(mb) > 1 for mb in c):
            i = max(range(len(c)), key=lambda j: len(c[j]))
            c[i : i + 1] = split_even(c[i], 2)
        c.extend([] for _ in range(k - len(c)))
    return cuts
