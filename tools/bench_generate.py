"""The two rollout engines on the same traffic: rayrl's vLLM pool and HF `generate`.

Tokens are counted the same way on both sides: a response's tokens up to and including
its first stop token (or the length cap); HF's padding after a finished response is
not counted, it is the waste that continuous batching avoids.
"""

from __future__ import annotations

import time
from typing import Any

from bench_common import BenchModel, Traffic


def response_length(tokens: list[int], stops: list[int]) -> int:
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1
    return len(tokens)


def hf_generate(model: BenchModel, traffic: Traffic, dtype: str, batch_prompts: int) -> dict:
    """HF `generate` as a TRL user runs it: left-padded batches, n return sequences each."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, dtype)).eval()
    pad = hf.config.pad_token_id or 0

    def run(prompts: list[list[int]], max_tokens: int) -> list[int]:
        lengths = []
        for i in range(0, len(prompts), batch_prompts):
            chunk = prompts[i : i + batch_prompts]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = (ids != pad).long()
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=traffic.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_tokens,
                    num_return_sequences=traffic.n,
                    eos_token_id=traffic.stop_token_ids,
                    pad_token_id=pad,
                )
            lengths += [response_length(r, traffic.stop_token_ids) for r in out[:, width:].tolist()]
        return lengths

    run(traffic.prompts[:2], 4)  # warm-up
    t0 = time.perf_counter()
    lengths = run(traffic.prompts, traffic.max_tokens)
    return _result(lengths, time.perf_counter() - t0, model)


def pool_generate(pool: Any, model: BenchModel, traffic: Traffic) -> dict:
    """The RolloutPool on the whole batch at once (continuous batching inside vLLM)."""
    args = dict(temperature=traffic.temperature, stop_token_ids=traffic.stop_token_ids)
    pool.generate(traffic.prompts[:2], 2, max_tokens=4, seed=1, **args)  # warm-up
    t0 = time.perf_counter()
    groups = pool.generate(
        traffic.prompts, traffic.n, max_tokens=traffic.max_tokens, seed=0, **args
    )
    seconds = time.perf_counter() - t0
    return _result([len(s.token_ids) for g in groups for s in g], seconds, model)


def _result(lengths: list[int], seconds: float, model: BenchModel) -> dict:
    tokens = sum(lengths)
    rate = tokens / seconds
    ordered = sorted(lengths)
    return {
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(rate, 1),
        "gflops": round(2 * model.matmul_params * rate / 1e9, 3),
        "response_len_p10_p50_p90": [ordered[int(q * (len(ordered) - 1))] for q in (0.1, 0.5, 0.9)],
    }
