"""`rayrl study CONFIG --dry-run`: will every trial fit, before any GPU is spent?

For each trial of the study it prints the placement-group bundles (study.trial_resources)
and, on GPU, each actor's estimated GPU memory by part (rayrl.models.memory) against
resources.gpu_memory_gib. Then it asks the connected Ray cluster to place each trial's
placement group, waits until the group is placed, and removes it: no actor starts. It raises
ConfigError (`rayrl` exits 2) naming each model that does not fit and the resource it lacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rayrl.config import Config, ConfigError
from rayrl.models.memory import architecture, learner_gib, rollout_gib
from rayrl.study.tuner import trial_resources

PLACEMENT_TIMEOUT_S = 60.0  # per trial; an autoscaler may add nodes meanwhile


@dataclass
class ActorEstimate:
    """One actor kind of one model: estimated GiB per GPU, by part."""

    model: str
    family: str
    actor: str  # "learner" (one GPU) or "rollout" (a vLLM engine of tensor_parallel GPUs)
    gpus: int
    parts: dict[str, float]
    capacity_gib: float

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


def models_of(cfg: Config) -> list[tuple[str, str]]:
    """The study's distinct (model, family) pairs, in trial order."""
    return list(dict.fromkeys((t.model, t.family) for t in cfg.trials()))


def estimates(cfg: Config, checkpointing: bool | None = None) -> list[ActorEstimate]:
    """Per-GPU memory estimates of each model's learner and rollout engine (GPU studies only);
    the learner with or without activation checkpointing as each model's resources say,
    unless `checkpointing` is given."""
    if cfg.resources.device != "gpu":
        return []
    out = []
    for model, family in models_of(cfg):
        r = cfg.resources_for(model, family)
        arch = architecture(cfg, model, family)
        ckpt = r.gradient_checkpointing if checkpointing is None else checkpointing
        learner = learner_gib(arch, r, cfg.grpo, ckpt)
        for actor, gpus, parts in (
            ("learner", 1, learner),
            ("rollout", r.tensor_parallel, rollout_gib(arch, r)),
        ):
            out.append(ActorEstimate(model, family, actor, gpus, parts, r.gpu_memory_gib))
    return out


def format_bundles(bundles: list[dict[str, float]]) -> str:
    """Runs of equal bundles as `count x {resource: amount}`."""
    runs: list[list[Any]] = []
    for b in bundles:
        if runs and runs[-1][1] == b:
            runs[-1][0] += 1
        else:
            runs.append([1, b])
    return ", ".join(
        f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in b.items() if v)}}}" for n, b in runs
    )


def format_estimates(rows: list[ActorEstimate]) -> str:
    """One line per actor: parts, total and capacity in GiB per GPU."""
    lines = []
    for e in rows:
        parts = " + ".join(f"{k} {v:.1f}" for k, v in e.parts.items())
        verdict = "fits" if e.fits else "DOES NOT FIT"
        lines.append(
            f"  {e.model} ({e.family}) {e.actor} x{e.gpus} GPU: {e.total_gib:.1f} of "
            f"{e.capacity_gib:g} GiB per GPU, {verdict}  [{parts}]"
        )
    return "\n".join(lines)


def memory_failures(cfg: Config) -> list[str]:
    """A message per actor whose estimate exceeds resources.gpu_memory_gib."""
    out = []
    with_ckpt = {(e.model, e.family, e.actor): e for e in estimates(cfg, checkpointing=True)}
    for e in estimates(cfg):
        if e.fits:
            continue
        biggest = max(e.parts, key=e.parts.get)
        msg = (
            f"{e.model} ({e.family}): a {e.actor} needs an estimated {e.total_gib:.1f} GiB per "
            f"GPU, more than resources.gpu_memory_gib = {e.capacity_gib:g} (largest part: "
            f"{biggest} {e.parts[biggest]:.1f} GiB)"
        )
        alt = with_ckpt[(e.model, e.family, e.actor)]
        if alt.fits and alt.total_gib < e.total_gib:
            msg += (
                f"; with activation checkpointing in the learner: {alt.total_gib:.1f} GiB "
                "(set resources.gradient_checkpointing: true)"
            )
        out.append(msg)
    return out


def connect() -> None:
    """Join the running cluster: RAY_ADDRESS (set inside `ray job submit`) or a local head."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        if not auth_token_found():
            # Ray's clusters take token authentication by default, and a client without
            # the token sees the same ConnectionError as one with no cluster at all.
            raise ConfigError(
                f"no Ray cluster accepted this process at {address!r} ({e}), and it holds no "
                f"auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {TOKEN_FILE} are unset or "
                "absent): if the cluster uses token authentication, copy the head's "
                f"{TOKEN_FILE} here or set RAY_AUTH_TOKEN; otherwise start one "
                "(`ray start --head`)"
            ) from None
        raise ConfigError(
            f"rayrl places each run on a running Ray cluster, and none answered at "
            f"{address!r} ({e}); start one (`ray start --head`) or run rayrl as a job "
            "(`ray job submit -- rayrl study CONFIG`)"
        ) from None


TOKEN_FILE = "~/.ray/auth_token"  # where `ray start` keeps the cluster's token


def auth_token_found() -> bool:
    """Does this process hold a Ray auth token, where Ray looks for one?"""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser(TOKEN_FILE)
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def placement_failures(cfg: Config, timeout_s: float = PLACEMENT_TIMEOUT_S) -> list[str]:
    """Place each trial's placement group on the connected cluster, then remove it; a message
    per trial whose group was not placed within `timeout_s`, naming what it lacks."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util import remove_placement_group

    out = []
    unplaced: dict[str, str] = {}  # bundles -> why: a trial like one that failed is not retried
    for t in cfg.trials():
        pgf = trial_resources(cfg, t.model, t.family)
        key = format_bundles(pgf.bundles)
        if key not in unplaced:
            pg = pgf.to_placement_group()
            try:
                ray.get(pg.ready(), timeout=timeout_s)
            except GetTimeoutError:
                unplaced[key] = f"not placed within {timeout_s:g} s: {lacking(pgf.bundles)}"
            finally:
                remove_placement_group(pg)
        if key in unplaced:
            out.append(
                f"{t.model} ({t.family}, seed {t.seed}, rollout_n {t.rollout_n}, "
                f"reuse {t.reuse_factor}): its placement group was {unplaced[key]}"
            )
    return out


def lacking(bundles: list[dict[str, float]]) -> str:
    """Which resource the cluster lacks for `bundles`, in words."""
    import ray

    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    for k, v in need.items():
        if v > have.get(k, 0.0):
            return f"it needs {v:g} {k}, the cluster has {have.get(k, 0.0):g}"
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for b in bundles:
        if not any(all(n.get(k, 0.0) >= v for k, v in b.items()) for n in nodes):
            return f"no node holds the bundle {format_bundles([b])}"
    return (
        f"the cluster has the resources in total ({format_bundles([need])}) but not free "
        "or not packable at once (other work running, or an autoscaler still adding nodes)"
    )


def storage_estimate(cfg: Config) -> str:
    """What the study leaves on its volume: each run's kept checkpoints (grpo.checkpoint_keep)
    and its final HF export (rayrl.checkpoint.storage_bytes), summed over the trials."""
    from rayrl.checkpoint import storage_bytes

    keep, total, lines = cfg.grpo.checkpoint_keep, 0, []
    trials = cfg.trials()
    for model, family in models_of(cfg):
        n = sum(1 for t in trials if (t.model, t.family) == (model, family))
        params = architecture(cfg, model, family).params()
        b = storage_bytes(params, cfg.resources_for(model, family), keep)
        total += n * sum(b.values())
        lines.append(
            f"  {model} ({family}): {n} run(s) x ({keep} checkpoints "
            f"{size(b['checkpoints'])} + HF export {size(b['export'])})"
        )
    head = f"storage (estimate, grpo.checkpoint_keep={keep}): {size(total)} in all"
    return "\n".join([head, *lines])


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure at 1 or more."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def dry_run(cfg: Config, placement_timeout_s: float | None = None) -> None:
    """Print every trial's bundles and memory estimates, place each trial's group on the
    connected cluster (waiting up to `placement_timeout_s` each, default
    PLACEMENT_TIMEOUT_S); raise ConfigError naming every model and resource that does not fit."""
    trials = cfg.trials()
    print(f"{cfg.source}: {len(trials)} trials of {len(models_of(cfg))} models")
    for model, family in models_of(cfg):
        n = sum(1 for t in trials if (t.model, t.family) == (model, family))
        bundles = trial_resources(cfg, model, family).bundles
        print(f"  {model} ({family}): {n} trials, bundles {format_bundles(bundles)}")
    rows = estimates(cfg)
    if rows:
        print("GPU memory per actor (estimates):")
        print(format_estimates(rows))
    print(storage_estimate(cfg))
    failures = memory_failures(cfg)
    connect()
    timeout = PLACEMENT_TIMEOUT_S if placement_timeout_s is None else placement_timeout_s
    placed = placement_failures(cfg, timeout)
    print(f"placement: {len(trials) - len(placed)} of {len(trials)} trials placed and removed")
    failures += placed
    if failures:
        raise ConfigError(
            f"{cfg.source}: {len(failures)} trial check(s) failed:\n  " + "\n  ".join(failures)
        )
    print("dry run: every trial fits")
