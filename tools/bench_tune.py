"""vLLM CPU settings sweep on one model and one traffic batch.

Settings the RolloutPool exposes (workers, threads per worker, dtype) go through the
real pool; engine knobs it does not expose (batch and token limits, thread binding,
compile) go through a single RolloutWorker subclass that passes them to `vllm.LLM`.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from bench_common import BenchModel, Traffic
from bench_generate import pool_generate

from rayrl.rollout.pool import RolloutPool, actor_env
from rayrl.rollout.worker import EXTENSION, RolloutWorker

# name -> (pool kwargs, extra engine kwargs or None for the real pool, env overrides)
VARIANTS: dict[str, tuple[dict, dict | None, dict]] = {
    "pool 1x1 fp32 (trainer default)": (dict(num_workers=1, num_cpus_per_worker=1), None, {}),
    "pool 1x2 fp32": (dict(num_workers=1, num_cpus_per_worker=2), None, {}),
    "pool 2x1 fp32": (dict(num_workers=2, num_cpus_per_worker=1), None, {}),
    "pool 1x2 bf16": (dict(num_workers=1, num_cpus_per_worker=2, dtype="bfloat16"), None, {}),
    "1x2 fp32 batched_tokens=16384": (
        dict(num_cpus_per_worker=2),
        dict(max_num_batched_tokens=16384, max_num_seqs=512),
        {},
    ),
    "1x2 fp32 bind=auto": (dict(num_cpus_per_worker=2), {}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}),
    "1x2 bf16 compiled": (
        dict(num_cpus_per_worker=2, dtype="bfloat16"),
        {"enforce_eager": False},
        {},
    ),
}
# The bf16 rollout against fp32 (issue 15): one engine on both cores, the same traffic.
BF16_PAIR = ("pool 1x2 fp32", "pool 1x2 bf16")
# The suite's default sweep; bind=auto and compile are opt-in (--tune NAME,...): auto
# binding measured equal to nobind here, and compiling takes minutes on 2 shared cores.
DEFAULT = [
    "pool 1x1 fp32 (trainer default)",
    "pool 1x2 fp32",
    "pool 2x1 fp32",
    "pool 1x2 bf16",
    "1x2 fp32 batched_tokens=16384",
]


class TunedWorker(RolloutWorker):
    """A RolloutWorker whose vllm.LLM takes extra engine arguments."""

    def __init__(self, model_path: str, dtype: str, kv_cache_gib: float, engine: dict) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=512,
            kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
            seed=0,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **{"enforce_eager": True, **engine},
        )


class OneWorkerPool:
    """Just enough of RolloutPool's generate for one TunedWorker."""

    def __init__(self, model: BenchModel, pool_kw: dict, engine: dict, env: dict) -> None:
        cpus = pool_kw.get("num_cpus_per_worker", 1)
        self.worker = (
            ray.remote(TunedWorker)
            .options(num_cpus=cpus, runtime_env={"env_vars": {**actor_env("cpu", cpus), **env}})
            .remote(model.path, pool_kw.get("dtype", "float32"), 0.5, engine)
        )
        ray.get(self.worker.ready.remote())

    def generate(self, prompts, n, temperature, max_tokens, seed=None, stop_token_ids=None):
        return ray.get(
            self.worker.generate.remote(prompts, n, temperature, max_tokens, seed, stop_token_ids)
        )

    def shutdown(self) -> None:
        ray.kill(self.worker)


def sweep(model: BenchModel, traffic: Traffic, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        pool_kw, engine, env = VARIANTS[name]
        t0 = time.perf_counter()
        try:
            if engine is None:
                pool: Any = RolloutPool(model.path, kv_cache_gib=0.5, max_model_len=512, **pool_kw)
                pool.wait_ready()
            else:
                pool = OneWorkerPool(model, pool_kw, engine, env)
            start_s = time.perf_counter() - t0
            result = pool_generate(pool, model, traffic)
            pool.shutdown()
            rows.append({"setting": name, "start_seconds": round(start_s, 1), **result})
        except Exception as e:  # noqa: BLE001 - one failing setting must not end the sweep
            rows.append({"setting": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(f"[tune] {rows[-1]}", flush=True)
    return rows
