"""Base pre-training of a ladder model on the synthetic arithmetic corpus (plain PyTorch).

The corpus is "prompt + \\boxed{answer}<eos>" for fresh random problems of every level up to
the task's max digits, never a held-out problem; an `unboxed_share` of answers is written
bare ("prompt + answer<eos>"), a format habit for RL to remove. The loss covers the
completion only: the operands are random, so predicting them teaches nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rayrl.data.synthetic import (
    Operands,
    answer,
    completion_text,
    corpus_level,
    draw_pair,
    prompt_text,
)


def corpus_batch(
    rng: random.Random,
    tokenizer: PreTrainedTokenizerFast,
    batch: int,
    max_digits: int,
    exclude: set[Operands],
    hardest_share: float,
    unboxed_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded; labels are -100 outside completions."""
    problems: list[Operands] = []
    for _ in range(batch):
        digits = corpus_level(rng, max_digits, hardest_share)
        p = draw_pair(rng, digits)
        while p in exclude:  # redraw at the same level, so the level shares stay as set
            p = draw_pair(rng, digits)
        problems.append(p)
    prompts = tokenizer([prompt_text(p) for p in problems], add_special_tokens=False)["input_ids"]
    texts = [
        str(answer(p)) if rng.random() < unboxed_share else completion_text(p) for p in problems
    ]
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seqs = [(q, a + [tokenizer.eos_token_id]) for q, a in zip(prompts, answers)]
    width = max(len(q) + len(a) for q, a in seqs)
    ids = torch.full((batch, width), tokenizer.pad_token_id)
    labels = torch.full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (q, a) in enumerate(seqs):
        n = len(q) + len(a)
        ids[i, :n] = torch.tensor(q + a)
        labels[i, len(q) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return ids, mask, labels


def lr_at(
    step: int, steps: int, peak: float, warmup_frac: float = 0.05, floor: float = 0.1
) -> float:
    """Linear warm-up, then cosine decay to `floor` * peak."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch: int,
    lr: float,
    max_digits: int,
    exclude: set[Operands],
    hardest_share: float,
    unboxed_share: float = 0.0,
    seed: int = 0,
    on_steps: Callable[[int], None] | None = None,
    report_every: int = 25,
) -> float:
    """Train in place for `steps` AdamW steps; returns the final smoothed loss.

    `on_steps(n)` hears about every `report_every` finished steps (for a progress bar).
    """
    rng = random.Random(f"{seed}:pretrain")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    smoothed = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        ids, mask, labels = corpus_batch(
            rng, tokenizer, batch, max_digits, exclude, hardest_share, unboxed_share
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()
        done = step + 1
        if on_steps and (done % report_every == 0 or done == steps):
            on_steps(done % report_every or report_every)
    model.eval()
    return smoothed
