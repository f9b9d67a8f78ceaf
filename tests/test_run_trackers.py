"""Trackers for `rayrl train` (issue 35): study.trackers' own callbacks write one run's step
and evaluation rows, TensorBoard by default, with the optimizer step as x-axis."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rayrl.cli as cli
from rayrl.config import load_config
from rayrl.study.trackers import RunTrackers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(f"ray/tune/{tag}")]


def feed(on_row, on_step, steps: int = 4) -> None:
    """What a run reports: each step's stats, an evaluation row every other step."""
    for s in range(1, steps + 1):
        on_step({"step": s, "reward_mean": s / 10, "kl": 0.01 * s})
        if s % 2 == 0:
            on_row({"step": s, "test_loss": 1 - s / 10, "test_loss_se": 0.01})


def test_tensorboard_gets_steps_and_evaluations(tmp_path: Path):
    cfg = load_config(TINY)
    assert cfg.study.trackers == ["tensorboard"]  # the default
    with RunTrackers(cfg, tmp_path, "run-1", {"trial": {"model": "tiny-3"}}) as t:
        feed(t.row, t.step)
    assert scalars(tmp_path, "reward_mean") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert scalars(tmp_path, "test_loss") == [(2, 0.8), (4, 0.6)]
    assert not list(tmp_path.glob("progress.csv"))  # Tune's own result files are not trackers


def test_mlflow_gets_the_run_too(tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow")
    cfg = load_config(TINY, {"study.trackers": ["mlflow"]})
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with RunTrackers(cfg, tmp_path, "run-1", {"trial": {"model": "tiny-3"}}) as t:
        feed(t.row, t.step)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "test_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(2, 0.8), (4, 0.6)]
    assert run.info.status == "FINISHED"


def test_rayrl_train_writes_its_rows_to_the_trackers(tmp_path: Path, monkeypatch):
    """The CLI hands the run's on_row/on_step to the trackers (the run itself is stubbed)."""
    monkeypatch.setattr(cli, "_init_ray", lambda *a, **k: None)

    def fake_train(cfg, trial, run_dir, resume=False, on_row=None, on_step=None, **kw):
        feed(on_row, on_step)
        return run_dir

    monkeypatch.setattr("rayrl.trainer.train", fake_train)
    out = tmp_path / "run"
    assert cli.main(["train", str(TINY), "--model", "tiny-3", "--out", str(out)]) == 0
    assert scalars(out, "test_loss") == [(2, 0.8), (4, 0.6)]
