"""Rollout and weight sync: the vLLM RolloutPool against HF `generate` on realistic RL
traffic, then the learner -> vLLM broadcast into the same pool, per model; then the vLLM
CPU settings sweep. One process, its own Ray.

    .venv/bin/python tools/bench_rollout.py [--models ladder,rand-25m,rand-150m]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import ladder_model, machine, random_model, rl_traffic, write_json  # noqa: E402
from bench_generate import hf_generate, pool_generate  # noqa: E402
from bench_sync import measure_sync  # noqa: E402
from bench_tune import BF16_PAIR, DEFAULT, sweep  # noqa: E402

from rayrl.rollout.pool import RolloutPool  # noqa: E402

# prompts per batch (n = 8 each) and HF prompts per generate call, by model
SIZES = {"ladder": (64, 64), "rand-25m": (8, 8), "rand-150m": (4, 4)}
# The sweep's batch: 32 prompts x 8 = 256 sequences, still far under a paper step (512
# prompts), and big enough that matmuls, not per-step overhead, set the speed. With 8
# prompts at 25M bf16 measured 1.13-1.44x fp32; with 32, 1.61x.
TUNE_PROMPTS = 32


def bench_model(key: str, workers: int, pool_cpus: int, dtype: str) -> dict:
    model = ladder_model() if key == "ladder" else random_model(key)
    prompts, hf_batch = SIZES[key]
    traffic = rl_traffic(model, prompts, n=8)
    out = {
        "model": model.name,
        "matmul_params": model.matmul_params,
        "prompts": prompts,
        "n": traffic.n,
        "prompt_len_min_max": [min(map(len, traffic.prompts)), max(map(len, traffic.prompts))],
        "max_tokens": traffic.max_tokens,
        "stops": "EOS" if model.trained else "EOS + 2 tokens (geometric lengths)",
        "dtype": dtype,
        "pool": f"{workers} workers x {pool_cpus} threads",
    }
    print(f"[rollout] {model.name}: HF generate", flush=True)
    out["hf"] = hf_generate(model, traffic, dtype, hf_batch)
    print(f"[rollout] {model.name}: vLLM pool {workers} x {pool_cpus} threads", flush=True)
    pool = RolloutPool(
        model.path,
        num_workers=workers,
        num_cpus_per_worker=pool_cpus,
        kv_cache_gib=0.5,
        dtype=dtype,
        max_model_len=512,
    )
    try:
        out["vllm"] = pool_generate(pool, model, traffic)
        print(f"[sync] {model.name}", flush=True)
        out["sync"] = measure_sync(pool, model.path)
    finally:
        pool.shutdown()
    out["ratio_vllm_over_hf"] = round(out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"], 3)
    print(f"[rollout] {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ladder,rand-25m,rand-150m")
    # The sweep's best on 2 shared cores: one single-threaded engine per core.
    ap.add_argument("--pool-workers", type=int, default=2, help="vLLM workers")
    ap.add_argument("--pool-cpus", type=int, default=1, help="threads per vLLM worker")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tune", default=",".join(DEFAULT), help="settings to sweep ('' skips)")
    ap.add_argument("--tune-model", default="rand-25m")
    args = ap.parse_args()

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = {"machine_before": machine(), "torch_threads": torch.get_num_threads()}
    result["models"] = [
        bench_model(k, args.pool_workers, args.pool_cpus, args.dtype)
        for k in args.models.split(",")
    ]
    if args.tune:
        model = random_model(args.tune_model)
        traffic = rl_traffic(model, TUNE_PROMPTS, n=8, seed=1)
        tune = result["tune"] = {"model": model.name, "prompts": TUNE_PROMPTS, "n": 8}
        tune["settings"] = sweep(model, traffic, args.tune.split(","))
        speed = {r["setting"]: r.get("tokens_per_s") for r in tune["settings"]}
        fp32, bf16 = (speed.get(name) for name in BF16_PAIR)
        if fp32 and bf16:
            tune["bf16"] = {"fp32_tokens_per_s": fp32, "bf16_tokens_per_s": bf16}
            tune["bf16"]["ratio"] = round(bf16 / fp32, 3)
    result["machine_after"] = machine()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    ray.shutdown()
    print(write_json("rollout", result))


if __name__ == "__main__":
    main()
