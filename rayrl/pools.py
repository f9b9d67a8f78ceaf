"""A run's three actor pools (rollout, learners, rewards), cold or warm.

A study's trials run in Tune actors that Tune reuses for the next trial with the same
resources (`reuse_actors`). The pools a run started stay in that process (`release`), and
the next run there takes them (`start_pools(..., warm=True)`): the learners rebuild their
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


_warm: Pools | None = None  # the last run's pools in this process, for the next one


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
    warm: bool = False,
) -> Pools:
    """The pools of a run of `model_dir`: with warm, the last released ones where their shape
    matches; new ones, started together, where not."""
    global _warm
    shape = pool_shapes(cfg, model, family)
    old = None
    if warm:  # a cold run leaves the warm set alone
        old, _warm = _warm, None
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


def release(pools: Pools, warm: bool) -> None:
    """A finished run's pools: kept for the next run in this process (warm), else stopped."""
    global _warm
    if warm:
        _warm = pools
    else:
        pools.shutdown()
