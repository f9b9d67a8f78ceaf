"""Learner -> vLLM weight broadcast against an in-process memory copy of the same bytes.

The bench process plays learner rank 0 (as tests/test_rollout.py does): it holds the HF
model's fp32 weights and is the pool's Broadcaster.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rayrl.rollout.sync import DEFAULT_BUCKET_BYTES, SHM_DIR, SyncStats, WeightSender

# label: (bucket bytes, the sender's shm_dir; "" keeps the buckets on the wire)
VARIANTS = {
    "bucketed": (DEFAULT_BUCKET_BYTES, SHM_DIR),  # the default: shared memory on one node
    "wire": (DEFAULT_BUCKET_BYTES, ""),  # gloo over loopback, the cross-node path
    "per_tensor": (0, ""),
}


class BenchLearner:
    """A Broadcaster that sends a fixed set of weights with a given bucket size."""

    def __init__(
        self, weights: list[tuple[str, torch.Tensor]], bucket_bytes: int, shm_dir: str
    ) -> None:
        self.weights, self.bucket_bytes, self.shm_dir = weights, bucket_bytes, shm_dir
        self.sender: WeightSender | None = None

    def init_weight_sync(self, **group: Any) -> None:
        group["shm_dir"] = self.shm_dir  # the sender's probe decides for the whole group
        self.sender = WeightSender(**group, bucket_bytes=self.bucket_bytes)

    def sync_weights(self) -> SyncStats:
        return self.sender.send(self.weights)


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Best time to copy nbytes between two fresh-touched buffers in this process."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_sync(pool: Any, model_path: str, syncs: int = 3) -> dict:
    """Bucketed (64 MiB) syncs through shared memory and over the wire, and one tensor at a
    time, into a live pool; best of `syncs`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    weights = [(n, p.detach()) for n, p in hf.named_parameters()]
    out: dict[str, Any] = {}
    for label, (bucket, shm_dir) in VARIANTS.items():
        learner = BenchLearner(weights, bucket, shm_dir)
        pool.connect(learner)
        pool.sync_weights()  # warm-up: first buffers, first loader pass
        runs = []
        for _ in range(syncs):
            t0 = time.perf_counter()
            stats = pool.sync_weights()
            runs.append((time.perf_counter() - t0, stats))
        wall, stats = min(runs, key=lambda r: r[0])
        learner.sender.close()
        out[label] = {
            "transport": learner.sender.transport,
            "bytes": stats.bytes,
            "tensors": stats.tensors,
            "buckets": stats.buckets,
            "send_seconds": round(stats.seconds, 4),
            "seconds": round(wall, 4),  # until every worker has loaded the weights
            "load_seconds": round(stats.load_seconds, 4),  # vLLM's layerwise reload alone
            "bytes_per_s": round(stats.bytes / wall),
        }
    nbytes = out["bucketed"]["bytes"]
    copy = memcpy_seconds(nbytes)
    out["memcpy_seconds"] = round(copy, 5)
    out["memcpy_bytes_per_s"] = round(nbytes / copy)
    for label in VARIANTS:
        out[label]["share_of_memcpy"] = round(copy / out[label]["seconds"], 4)
        # The most any transport could reach while vLLM's reload copies the weights in.
        out[label]["load_share_of_memcpy"] = round(copy / out[label]["load_seconds"], 4)
    return out
