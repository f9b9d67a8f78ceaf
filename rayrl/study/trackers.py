"""The experiment trackers a study reports to, as Ray Tune's own logger callbacks.

study.trackers picks among TensorBoard (TBXLoggerCallback, event files in each trial's
directory), MLflow (MLflowLoggerCallback: the local file store STUDY_DIR/mlflow unless
study.mlflow_tracking_uri names a server or another store) and W&B (WandbLoggerCallback:
offline runs under STUDY_DIR/wandb unless WANDB_API_KEY is set). Each gets every result a
trial reports, step rows and evaluation rows alike, with the trial's config as its
parameters. The optimizer step (metrics.TRACKER_STEP) is the x-axis of TensorBoard and
MLflow; W&B's own step is Tune's training iteration, and the optimizer step is its
TRACKER_STEP column.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ray.tune import Callback

from rayrl.config import Config
from rayrl.metrics import EVAL, STEP, trial_result

FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"  # readers of the file store set it too


def mlflow_uri(cfg: Config, study_dir: Path) -> str:
    """Where the study's MLflow runs go: study.mlflow_tracking_uri, else STUDY_DIR/mlflow."""
    return cfg.study.mlflow_tracking_uri or (study_dir / "mlflow").resolve().as_uri()


def wandb_dir(study_dir: Path) -> Path:
    """Where W&B writes its runs (in a wandb/ folder of its own below this).

    Not the trial's directory: Tune copies that to the study's storage when the trial ends,
    before the logging actor's wandb.finish has written the run, which left copies holding
    only the file header."""
    return (study_dir / "wandb").resolve()


def wandb_mode() -> str:
    """W&B syncs only with an API key; without one it writes offline runs."""
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def tracker_callbacks(cfg: Config, study_dir: Path) -> list[Callback]:
    """Tune's CSV and JSON result loggers (Tune reads its results back from them), then one
    logger callback per tracker in study.trackers.

    The study turns off Tune's automatic loggers (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS), so a
    tracker left out of study.trackers is really off."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks: list[Callback] = [CSVLoggerCallback(), JsonLoggerCallback()]
    for tracker in cfg.study.trackers:
        if tracker == "tensorboard":
            callbacks.append(TBXLoggerCallback())
        elif tracker == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = mlflow_uri(cfg, study_dir)
            if urlparse(uri).scheme in ("", "file"):
                # MLflow 3 keeps its file store behind this opt-in (a database needs SQLAlchemy,
                # which mlflow-skinny lacks); the callback writes from this, the driver, process.
                os.environ.setdefault(FILE_STORE_OPT_IN, "true")
            callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.study.name))
        elif tracker == "wandb":
            from ray.air.integrations.wandb import WANDB_MODE_ENV_VAR, WandbLoggerCallback

            mode = wandb_mode()
            if mode == "offline":  # Ray's callback asks for a key unless the driver is offline
                os.environ[WANDB_MODE_ENV_VAR] = mode
            root = wandb_dir(study_dir)
            root.mkdir(parents=True, exist_ok=True)
            callbacks.append(WandbLoggerCallback(project=cfg.study.name, mode=mode, dir=str(root)))
    return callbacks


class _RunTrial:
    """What Tune's logger callbacks read of a trial, for one `rayrl train` run."""

    def __init__(self, run_dir: Path, run_id: str, params: dict) -> None:
        self.trial_id = self.experiment_dir_name = run_id
        self.local_path = str(run_dir)
        self.config = self.evaluated_params = params
        self.checkpoint = None

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.trial_id


class RunTrackers:
    """study.trackers for one `rayrl train` run: the callbacks of tracker_callbacks, which a
    study hands to Tune, fed each step and evaluation row as a trial reports them
    (metrics.trial_result). TensorBoard's event files go into the run directory, MLflow's and
    W&B's runs where a study's would, with RUN_DIR for the study directory. A context
    manager: leaving it ends the tracker runs, as failed when an exception leaves it."""

    def __init__(self, cfg: Config, run_dir: Path, run_id: str, params: dict) -> None:
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        tune_files = (CSVLoggerCallback, JsonLoggerCallback)  # what Tune reads back: no tracker
        callbacks = tracker_callbacks(cfg, run_dir)
        self.callbacks = [c for c in callbacks if not isinstance(c, tune_files)]
        self.trial, self.iteration = _RunTrial(run_dir, run_id, params), 0
        for c in self.callbacks:
            c.setup()
            c.on_trial_start(0, [self.trial], self.trial)

    def __enter__(self) -> RunTrackers:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.close(failed=kind is not None)

    def row(self, row: dict) -> None:
        """An evaluation row (Run's on_row)."""
        self.report(trial_result(EVAL, row, {"run_id": self.trial.trial_id}))

    def step(self, stats: dict) -> None:
        """An optimizer step's stats (Run's on_step)."""
        self.report(trial_result(STEP, stats, {"run_id": self.trial.trial_id}))

    def report(self, result: dict) -> None:
        """One result as a trial reports it."""
        self.iteration += 1
        result = {**result, "training_iteration": self.iteration, "trial_id": self.trial.trial_id}
        for c in self.callbacks:
            c.on_trial_result(self.iteration, [self.trial], self.trial, result)

    def close(self, failed: bool = False) -> None:
        for c in self.callbacks:
            if failed:
                c.on_trial_error(self.iteration, [self.trial], self.trial)
            else:
                c.on_trial_complete(self.iteration, [self.trial], self.trial)
            c.on_experiment_end([self.trial])
