"""Held-out pass@1 of a ladder model: k samples per problem at the evaluation temperature."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rayrl.data.templates import render_prompt
from rayrl.rewards import score


@torch.no_grad()
def pass_at_1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict],
    samples: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch: int = 512,
) -> float:
    """Mean over problems of the fraction of `samples` completions that are correct."""
    torch.manual_seed(seed)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation
    graded = [r for r in rows for _ in range(samples)]
    prompts = [render_prompt(r, tokenizer) for r in graded]
    correct = 0
    try:
        for i in range(0, len(prompts), batch):
            enc = tokenizer(
                prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for text, row in zip(texts, graded[i : i + batch]):
                truth = row["reward_model"]["ground_truth"]
                correct += score(row["data_source"], text, truth, row["ability"])
    finally:
        tokenizer.padding_side = side
    return correct / len(prompts)
