"""Shared fixtures: one Ray instance per test session, the real guru data, a scratch dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GURU = Path(os.environ.get("RAYRL_GURU_DIR", ROOT.parent / "shared" / "data" / "guru"))


@pytest.fixture(scope="session")
def guru_dir() -> Path:
    if not GURU.is_dir():
        pytest.fail(
            f"guru data not found at {GURU}; set RAYRL_GURU_DIR or put shared/ beside the repo"
        )
    return GURU


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: fixed CPUs, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a head another test (or test worker) started with `ray start`
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            # Workers import test modules (trainables, fakes defined in tests) by name.
            runtime_env={
                "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "tests")}
            },
        )
    yield ray
    # Left running on purpose: later tests in the session reuse it; pytest exit tears it down.


@pytest.fixture
def started(monkeypatch) -> list:
    """What the CLI started, in order: "ray" when it reached Ray (every actor starts after
    it), then (cfg, trial) of the run it would have trained. Nothing runs."""
    from rayrl import cli

    calls: list = []
    monkeypatch.setattr(cli, "_init_ray", lambda *a, **k: calls.append("ray"))
    monkeypatch.setattr("rayrl.trainer.train", lambda cfg, t, *a, **k: calls.append((cfg, t)))
    return calls
