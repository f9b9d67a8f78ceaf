"""LearnerGroup: the DeepSpeed learner ranks as one Ray actor pool."""

from __future__ import annotations

from typing import Any

import ray

from rayrl.config import GRPOConfig, ResourcesConfig
from rayrl.learner.actor import Learner
from rayrl.learner.batch import TrainItem, split_even


class LearnerGroup:
    def __init__(
        self, model_path: str, grpo: GRPOConfig, resources: ResourcesConfig, rollout_n: int
    ) -> None:
        n = resources.learners
        remote = ray.remote(Learner).options(
            num_cpus=resources.cpus_per_actor,
            num_gpus=1 if resources.device == "gpu" else 0,
            # DeepSpeed's CPU accelerator picks its thread count from the visible cores.
            runtime_env={
                "env_vars": {"DS_ACCELERATOR": "cuda" if resources.device == "gpu" else "cpu"}
            },
        )
        self.actors = [
            remote.remote(r, n, model_path, grpo, resources, rollout_n) for r in range(n)
        ]
        addr, port = ray.get(self.actors[0].address.remote())
        self.gas = ray.get([a.setup.remote(addr, port) for a in self.actors])[0]

    def train(self, items: list[TrainItem], temperature: float) -> dict[str, float]:
        """One optimizer step over the whole batch, sharded across ranks."""
        shards = split_even(items, len(self.actors))
        per_rank = ray.get([a.train.remote(s, temperature) for a, s in zip(self.actors, shards)])
        out = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0]}
        for k in ("tokens_processed", "response_tokens"):
            out[k] = sum(r[k] for r in per_rank)
        out["seconds"] = max(r["seconds"] for r in per_rank)
        return out

    def init_weight_sync(self, **kwargs: Any) -> ray.ObjectRef:
        """Rank 0 joins the broadcast group; returns the pending call (the receivers join too)."""
        return self.actors[0].init_weight_sync.remote(**kwargs)

    def sync_weights(self) -> Any:
        """Blocks until rank 0 has broadcast; returns its SyncStats."""
        return ray.get([a.sync_weights.remote() for a in self.actors])[0]

    def save(self, path: str, tag: str) -> None:
        ray.get([a.save.remote(path, tag) for a in self.actors])

    def load(self, path: str, tag: str) -> None:
        ray.get([a.load.remote(path, tag) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
