"""LearnerGroup: the DeepSpeed learner ranks as one Ray actor pool."""

from __future__ import annotations

from typing import Any

import ray

from rayrl.config import GRPOConfig, ResourcesConfig
from rayrl.learner.actor import Learner
from rayrl.learner.batch import TrainItem, split_even
from rayrl.learner.grpo import loss_denominator, merge_stats

# Token-weighted means over every update of a step.
MEAN_PER_TOKEN = ("pg_loss", "kl", "clip_frac", "clip_frac_dual", "ratio_mean")


class LearnerGroup:
    def __init__(
        self, model_path: str, grpo: GRPOConfig, resources: ResourcesConfig, rollout_n: int
    ) -> None:
        n = resources.learners
        self.grpo = grpo
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
        """One rollout batch: `grpo.mini_batches` optimizer updates, each over every rank.

        The batch is cut into mini-batches first (contiguous, so groups stay whole) and each
        mini-batch is sharded across the ranks: the updates do not depend on the rank count.
        """
        g = self.grpo
        mini_batches = split_even(items, g.mini_batches)
        denoms = [
            loss_denominator([len(it.response_ids) for it in mb], g.loss_agg) for mb in mini_batches
        ]
        shards = [split_even(mb, len(self.actors)) for mb in mini_batches]
        per_rank = ray.get(
            [
                a.train.remote([s[r] for s in shards], denoms, temperature)
                for r, a in enumerate(self.actors)
            ]
        )
        total = merge_stats(per_rank)
        tokens = max(total["tokens"], 1.0)
        updates = g.mini_batches * g.ppo_epochs
        return {
            "loss": total["loss"] / updates,  # mean over updates of each update's loss
            **{k: total[k] / tokens for k in MEAN_PER_TOKEN},
            "ratio_max": total["ratio_max"],
            "logp_diff_mean": total["logp_diff"] / max(total["logp_diff_tokens"], 1.0),
            "logp_diff_max": total["logp_diff_max"],
            "grad_norm": per_rank[0]["grad_norm"],
            "tokens_processed": total["tokens_processed"],
            "forward_tokens": total["forward_tokens"],
            "seconds": max(r["seconds"] for r in per_rank),
        }

    def named_weights(self) -> list[tuple[str, Any]]:
        """Rank 0's full weights; every rank is asked, since under ZeRO-3 gathering is a collective."""
        return ray.get([a.named_weights.remote() for a in self.actors])[0]

    def resident_param_bytes(self) -> list[int]:
        """Each rank's policy and reference parameter bytes (its shards under ZeRO-3)."""
        return ray.get([a.resident_param_bytes.remote() for a in self.actors])

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
