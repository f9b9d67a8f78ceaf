"""A run's three actor pools (rollout, learners, rewards), cold or warm.

A study's trials run in Tune actors that Tune reuses for the next trial with the same
resources (`reuse_actors`). The pools a run started stay with the study in that process
(`release` into its WarmPools), and the study's next run there takes them
(`start_pools(..., warm=WarmPools.of(study))`): the learners rebuild their
engines from the new run's base checkpoint with a fresh optimizer, on the same actors and
process group; the rollout engines get those weights through the usual weight sync, and
for another model rebuild in their own processes (RolloutWorker.reload); the reward workers
are stateless. A pool whose shape differs is rebuilt, alone. A run's rows
are the same cold or warm (tests/test_trainer.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayrl.config import Config
from rayrl.learner.group import LearnerGroup
from rayrl.rewards.pool import RewardPool
from rayrl.rollout.pool import RolloutPool

log = logging.getLogger(__name__)


@dataclass
class Pools:
    rollout: RolloutPool
    learners: LearnerGroup
    rewards: RewardPool
    shape: dict[str, Any]  # per pool, what a warm run must match to take it

    def shutdown(self) -> None:
        self.rollout.shutdown()
        self.rewards.shutdown()
        self.learners.shutdown()


class WarmPools:
    """A study's released pools in one process, for its next run there. One per study
    (`of`), so two studies that share a process never hand each other pools."""

    _of_study: dict[str, WarmPools] = {}

    def __init__(self) -> None:
        self.pools: Pools | None = None

    @classmethod
    def of(cls, study: str) -> WarmPools:
        return cls._of_study.setdefault(study, cls())

    def take(self) -> Pools | None:
        pools, self.pools = self.pools, None
        return pools

    def shutdown(self) -> None:
        """Stop the pools held, if any."""
        if (pools := self.take()) is not None:
            pools.shutdown()


def pool_shapes(cfg: Config, model: str, family: str) -> dict[str, Any]:
    """Each pool's constructor arguments that a warm pool must share. None names the model:
    the learners rebuild for any model and rollout n, the rollout engines reload in place."""
    g, r = cfg.grpo, cfg.resources_for(model, family)
    return {
        "rollout": dict(
            num_workers=r.rollout_workers,
            tensor_parallel=r.tensor_parallel,
            device=r.device,
            kv_cache_gib=r.vllm_kv_cache_gib,
            dtype=r.vllm_dtype,
            max_model_len=g.max_prompt_tokens + g.max_new_tokens,
            num_cpus_per_worker=r.cpus_per_actor,
        ),
        "learners": (g, r),
        "rewards": dict(
            num_workers=r.reward_workers, num_cpus_per_worker=min(r.cpus_per_actor, 0.5)
        ),
    }


def start_pools(
    cfg: Config,
    model: str,
    family: str,
    model_dir: str,
    rollout_n: int,
    seed: int,
    name: str,
    warm: WarmPools | None = None,
) -> Pools:
    """The pools of a run of `model_dir`: from `warm`, the last released ones where their
    shape matches; new ones, started together, where not. A cold run (warm None) leaves every
    study's warm pools alone."""
    shape = pool_shapes(cfg, model, family)
    old = warm.take() if warm is not None else None
    if old is not None and not old.learners.alive():  # a dead rank: its group is gone too
        old.shutdown()
        old = None
    same = {k: old is not None and old.shape[k] == v for k, v in shape.items()}
    if old is not None:
        log.info("warm pools: reusing %s", ", ".join(k for k, v in same.items() if v) or "none")
        for k in (k for k, v in same.items() if not v):
            getattr(old, k).shutdown()
    g, r = shape["learners"]
    # The vLLM engines build in the background while the learners and reward workers start.
    # Engines built now load the base weights; warm ones still hold the last run's.
    stale = same["rollout"] and old.rollout.model_path == model_dir
    if same["rollout"]:
        rollout = old.rollout
        if not stale:  # another model: new engines in the same actors
            rollout.reload(model_dir, seed)
    else:
        rollout = RolloutPool(model_dir, **shape["rollout"], seed=seed, name=name)
    if same["learners"]:
        learners = old.learners
        learners.reset(model_dir, rollout_n)
    else:
        learners = LearnerGroup(model_dir, g, r, rollout_n)
    rewards = old.rewards if same["rewards"] else RewardPool(**shape["rewards"])
    learners.wait_ready()
    if not rollout.connected_to(learners):
        rollout.connect(learners)
    if stale:
        rollout.sync_weights()
    return Pools(rollout, learners, rewards, shape)


def release(pools: Pools, warm: WarmPools | None) -> None:
    """A finished run's pools: kept in `warm` for the study's next run in this process, else
    stopped."""
    if warm is not None:
        warm.pools = pools
    else:
        pools.shutdown()
