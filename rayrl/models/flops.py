"""Parameter counting and FLOPs accounting (paper appendix C.1)."""

from __future__ import annotations

import torch


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """Return (total, non_embedding) parameter counts.

    Non-embedding excludes the token embedding and an untied output head, the
    convention of Kaplan et al. that the paper's N follows. A tied head is counted once.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = 0
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if inp is not None:
        embedding += inp.weight.numel()
    if out is not None and out.weight is not (inp.weight if inp is not None else None):
        embedding += out.weight.numel()
    return total, total - embedding


def train_flops(n_params: int, tokens: int) -> float:
    """C = 6 * N * T: forward 2NT plus backward 4NT for one optimizer step (eq. 10-11)."""
    return 6.0 * n_params * tokens


def forward_flops(n_params: int, tokens: int) -> float:
    """2 * N * T: one forward pass, as in rollout generation or the reference model."""
    return 2.0 * n_params * tokens
