"""LearnerGroup: the DeepSpeed learner ranks as one Ray actor pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from rayrl.config import GRPOConfig, ResourcesConfig
from rayrl.learner.actor import Learner, grad_accumulation_steps
from rayrl.learner.batch import TrainItem, micro_batches, split_even
from rayrl.learner.grpo import loss_denominator
from rayrl.learner.stats import finish, merge


class LearnerGroup:
    def __init__(
        self, model_path: str, grpo: GRPOConfig, resources: ResourcesConfig, rollout_n: int
    ) -> None:
        """Start the ranks; they build their engines in the background (wait_ready), and a
        call made earlier queues behind the build."""
        n = resources.learners
        self.grpo = grpo
        self.gas = grad_accumulation_steps(grpo, rollout_n, n)  # micro-batches per update
        remote = ray.remote(Learner).options(
            num_cpus=resources.cpus_per_actor,
            num_gpus=1 if resources.device == "gpu" else 0,
            # DeepSpeed's CPU accelerator picks its thread count from the visible cores.
            runtime_env={
                "env_vars": {"DS_ACCELERATOR": "cuda" if resources.device == "gpu" else "cpu"}
            },
        )
        self.actors = [remote.remote(r, n, grpo, resources) for r in range(n)]
        # Every rank placed before the caller starts its other pools: in a trial's placement
        # group an actor takes any bundle with room, and a 0.5-CPU reward worker placed first
        # could split a learner's 1-CPU bundle, leaving it unplaceable (seen in the tiny study).
        master = ray.get([a.address.remote() for a in self.actors])[0]
        self._building = [a.setup.remote(master, model_path, rollout_n) for a in self.actors]

    def wait_ready(self) -> None:
        """Block until every rank's engine is built; raises if one failed to build."""
        if self._building:
            ray.get(self._building)
            self._building = []

    def reset(self, model_path: str, rollout_n: int) -> None:
        """A new run on the same ranks: each rebuilds its engine from `model_path`'s weights
        with a fresh optimizer, as a cold start would; the process group and the weight
        sender stay."""
        self.wait_ready()
        self.gas = grad_accumulation_steps(self.grpo, rollout_n, len(self.actors))
        self._building = [a.build.remote(model_path, rollout_n) for a in self.actors]

    def alive(self) -> bool:
        try:
            ray.get([a.address.remote() for a in self.actors], timeout=30)
        except ray.exceptions.RayError:  # dead, or too busy to answer
            return False
        return True

    def train(self, items: list[TrainItem], temperature: float) -> dict[str, float]:
        """One rollout batch: `grpo.mini_batches` optimizer updates, each over every rank."""
        return self.start_train(items, temperature)()

    def start_train(
        self, items: list[TrainItem], temperature: float
    ) -> Callable[[], dict[str, float]]:
        """Start `train` on the ranks and return at once; the returned call waits for the
        step and gives its statistics (the overlapped loop generates in between).

        The batch is cut into mini-batches first (contiguous, so groups stay whole), each
        mini-batch is sharded across the ranks and each shard cut into micro-batches
        (`grpo.micro_batch` samples, or by `grpo.micro_batch_tokens`): the updates depend on
        neither the rank count nor the cut. The statistics merge by rayrl/learner/stats.py.
        """
        g = self.grpo
        mini_batches = split_even(items, g.mini_batches)
        denoms = [loss_denominator([len(it.response_ids) for it in mb], g) for mb in mini_batches]
        shards = [
            micro_batches(split_even(mb, len(self.actors)), self.gas, g.micro_batch_tokens)
            for mb in mini_batches
        ]
        refs = [
            a.train.remote([s[r] for s in shards], denoms, temperature)
            for r, a in enumerate(self.actors)
        ]
        return lambda: finish(merge(ray.get(refs)))

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
