"""Resuming a study: which trials remain, and whether today's config may continue the runs
its study directory holds.

A run's id names its trial (model, family, n, tau, seed), not its hyperparameters, so a
config edited between two invocations would continue old runs under new settings. The
stored config (STUDY_DIR/config.yaml) is compared key by key with today's: a change in a
key that changes what a run computes refuses the resume, unless the user says the change
is meant (--restart-changed); then the runs it touches are moved aside and start again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from rayrl.checkpoint import checkpoint_state
from rayrl.config import Config, ConfigError, from_dict
from rayrl.trial import Trial

# Keys that decide which trials exist, where runs go, how they are scheduled or how fast
# they run, never what a run computes: changing them resumes as before.
NEUTRAL = (
    "study.",
    "output_dir",
    "ladder.dir",
    "resources.cpus_per_actor",
    "resources.gpu_memory_gib",
    "resources.vllm_kv_cache_gib",
    "resources.gradient_checkpointing",
)
REPLACED = "replaced"  # STUDY_DIR/replaced/<time>/: runs a meant config change started again


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value; a ladder model's keys are named by model and family, so
    reordering ladder.models changes nothing."""
    raw = dataclasses.asdict(cfg)
    raw.pop("source")
    models = raw["ladder"].pop("models")
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(raw, "")
    for m in models:
        walk(m, f"ladder.models[{m['name']} ({m['family']})].")
    return out


def changed_keys(stored: Config, today: Config) -> list[str]:
    """The keys, besides NEUTRAL ones, whose values differ (added or dropped keys too)."""
    a, b = flatten(stored), flatten(today)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in keys if not k.startswith(NEUTRAL)]


def touches(key: str, trial: Trial) -> bool:
    """Does a change of `key` change `trial`'s run? A ladder model's own keys touch its runs."""
    if key.startswith("ladder.models["):
        return key.startswith(f"ladder.models[{trial.model} ({trial.family})].")
    return True


def stored_config(study_dir: Path) -> Config | None:
    path = study_dir / "config.yaml"
    if not path.exists():
        return None
    return from_dict(Config, yaml.safe_load(path.read_text()) or {}, str(path), "")


def check_resume(cfg: Config, study_dir: Path, restart_changed: bool = False) -> None:
    """Refuse to continue a study's runs under a config that changes what they compute; with
    restart_changed, move the touched runs aside (nothing is deleted) so they start again."""
    stored = stored_config(study_dir)
    if stored is None:
        return
    keys = changed_keys(stored, cfg)
    runs = study_dir / "runs"
    held = [t for t in cfg.trials() if (runs / t.run_id).exists()]
    touched = [t for t in held if any(touches(k, t) for k in keys)]
    if not touched:
        return
    if not restart_changed:
        a, b = flatten(stored), flatten(cfg)
        diff = "; ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys)
        raise ConfigError(
            f"{cfg.source}: {study_dir} holds {len(touched)} run(s) made under another config "
            f"({diff}); resuming would continue them under the new values. Use a new study "
            "directory (--out), or pass --restart-changed to start those runs again"
        )
    aside = study_dir / REPLACED / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for t in touched:
        shutil.move(str(runs / t.run_id), str(aside / t.run_id))
    # The fitter's rows and the scheduler's decisions about them go too; the untouched runs'
    # rows come back from their own metrics files when the study starts.
    for name in ("fitter", "scheduler.jsonl"):
        if (study_dir / name).exists():
            shutil.move(str(study_dir / name), str(aside / name))
    old = aside / "scheduler.jsonl"
    if old.exists():
        ids = {t.run_id for t in touched}
        kept = [ln for ln in old.read_text().splitlines() if json.loads(ln)["run_id"] not in ids]
        (study_dir / "scheduler.jsonl").write_text("".join(ln + "\n" for ln in kept))
    print(f"{len(touched)} run(s) moved to {aside}; they start again", flush=True)


def remaining_trials(cfg: Config, study_dir: Path) -> list[Trial]:
    """The study's trials still to run: neither checkpointed at their last step nor stopped
    by the scheduler. Failed, interrupted and unstarted trials all remain."""
    from rayrl.study.scheduler import read_decisions

    stopped = {d["run_id"] for d in read_decisions(study_dir) if d["action"] == "stop"}

    def done(t: Trial) -> bool:
        state = checkpoint_state(study_dir / "runs" / t.run_id)
        g = cfg.with_overrides(dict(t.overrides)).grpo  # the variant's budget
        # A run ends when its data budget is drawn: dynamic sampling draws it in fewer steps.
        drawn = None if state is None else state.get("data", state["step"] * g.prompts_per_step)
        return t.run_id in stopped or (drawn is not None and drawn >= g.data_budget)

    return [t for t in cfg.trials() if not done(t)]
