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
