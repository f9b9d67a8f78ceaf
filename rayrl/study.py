"""`rayrl study`: a Ray Tune search over model x family x rollout n x reuse factor x seed.

Each trial is one GRPO run (rayrl.trainer) whose actors live in the trial's placement
group. Every metric row goes to the run's own metrics.parquet, to `tune.report` and to
the FitterActor. Running the same command again resumes the study: finished trials are
kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune

from rayrl.config import Config, dump_config
from rayrl.trainer import RunSpec, train

log = logging.getLogger(__name__)
FITTER_TIMEOUT_S = 30.0


def param_space(cfg: Config) -> dict[str, Any]:
    """One grid entry per distinct trial of the study's sweeps."""
    return {"trial": tune.grid_search(cfg.trials())}


def trial_resources(
    cfg: Config, model: str, family: str | None = None
) -> tune.PlacementGroupFactory:
    """One bundle for the trial driver, then one per actor of the model's pools."""
    r = cfg.resources_for(model, family)
    gpu = 1 if r.device == "gpu" else 0
    bundles = [{"CPU": 0.1}]
    bundles += [{"CPU": r.cpus_per_actor, "GPU": gpu * r.tensor_parallel}] * r.rollout_workers
    bundles += [{"CPU": r.cpus_per_actor, "GPU": gpu}] * r.learners
    bundles += [{"CPU": min(r.cpus_per_actor, 0.5)}] * r.reward_workers
    return tune.PlacementGroupFactory(bundles)


def run_cpus(cfg: Config, models: list[tuple[str, str]] | None = None) -> float:
    """Logical CPUs the largest run of `models` (model, family), by default the study's, reserves."""
    models = models or [(t["model"], t["family"]) for t in cfg.trials()]
    return max(
        (sum(b.get("CPU", 0.0) for b in trial_resources(cfg, m, f).bundles) for m, f in models),
        default=0.0,
    )


def run_trial(params: dict[str, Any], cfg: Config, study_dir: str) -> None:
    """The Tune trainable: one GRPO run, resumed from its own checkpoint when one exists."""
    from rayrl.scaling.fitter import get_or_create_fitter

    t = params["trial"]
    spec = RunSpec(t["model"], t["rollout_n"], t["reuse_factor"], t["seed"], family=t["family"])
    fitter = get_or_create_fitter(cfg.study.name, str(Path(study_dir) / "fitter"), x=cfg.study.x)
    total_steps = cfg.grpo.data_budget // cfg.grpo.prompts_per_step
    x_col = "compute_flops" if cfg.study.x == "compute" else "data_samples"

    def on_row(row: dict[str, Any]) -> None:
        # The run's metrics.parquet already holds the row; a fitter that is down is
        # caught up from those files when it returns, so the trial never waits on it.
        try:
            ray.get(fitter.add_rows.remote([row]), timeout=FITTER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any fitter failure must not fail the trial
            log.warning("fitter unavailable (%s); row kept in the run's metrics.parquet", e)
        x_end = row[x_col] * total_steps / max(row["step"], 1)
        try:
            pred = ray.get(
                fitter.predict_final.remote(spec.run_id, x_end), timeout=FITTER_TIMEOUT_S
            )
        except Exception:  # noqa: BLE001 - a prediction is a nicety for the live table
            pred = None
        tune.report(
            {
                **row,
                "total_steps": total_steps,
                "sweeps": ",".join(t["sweeps"]),
                "predicted_final": pred["mean"] if pred else float("nan"),
            }
        )

    train(
        cfg,
        spec,
        Path(study_dir) / "runs" / spec.run_id,
        resume=True,
        on_row=on_row,
        progress=False,
    )


def collect_metrics(study_dir: Path) -> pd.DataFrame:
    """All trials' rows, from the runs' own files: the study's source of truth."""
    parts = [pd.read_parquet(p) for p in sorted((study_dir / "runs").glob("*/metrics.parquet"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def run_study(cfg: Config, scheduler: bool = True, out_dir: str | None = None) -> Path:
    """Run (or resume) the study and write metrics.parquet, fit.json and the report."""
    from rayrl.report import write_report
    from rayrl.scaling.fitter import get_or_create_fitter
    from rayrl.scaling.scheduler import ScalingLawScheduler

    study_dir = Path(out_dir or cfg.output_dir).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    check_model_paths(cfg)
    dump_config(cfg, study_dir / "config.yaml")
    fitter = get_or_create_fitter(cfg.study.name, str(study_dir / "fitter"), x=cfg.study.x)
    catch_up(fitter, collect_metrics(study_dir))

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, study_dir=str(study_dir)),
        lambda params: trial_resources(cfg, params["trial"]["model"], params["trial"]["family"]),
    )
    sched = ScalingLawScheduler(
        fitter_name=cfg.study.name,
        grace_fraction=cfg.study.scheduler_grace_fraction,
        enabled=scheduler and cfg.study.scheduler,
        x=cfg.study.x,
        log_path=str(study_dir / "scheduler.jsonl"),
    )
    reporter = tune.CLIReporter(
        metric_columns={
            "step": "step",
            "test_loss": "loss",
            "predicted_final": "pred. final",
            "reward_mean": "reward",
        },
        parameter_columns={f"trial/{k}": k for k in ("model", "rollout_n", "reuse_factor", "seed")},
        max_report_frequency=30,
    )
    # The classic table reporter: the new output engine ignores our live-table columns.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tune_dir = study_dir / "tune"
    if tune.Tuner.can_restore(str(tune_dir / cfg.study.name)):
        tuner = tune.Tuner.restore(
            str(tune_dir / cfg.study.name), trainable, resume_unfinished=True, restart_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                scheduler=sched, max_concurrent_trials=cfg.study.max_concurrent
            ),
            run_config=tune.RunConfig(
                name=cfg.study.name,
                storage_path=str(tune_dir),
                progress_reporter=reporter,
                failure_config=tune.FailureConfig(max_failures=2),
                verbose=1,
            ),
        )
    results = tuner.fit()

    metrics = collect_metrics(study_dir)
    if metrics.empty:
        raise RuntimeError(
            f"{study_dir}: no trial recorded a metric row; trial errors: {trial_errors(results)}"
        )
    metrics.to_parquet(study_dir / "metrics.parquet", index=False)
    catch_up(fitter, metrics)
    write_report(study_dir)
    if results.errors:
        raise RuntimeError(
            f"{len(results.errors)} trial(s) failed (report written with the rest): "
            f"{trial_errors(results)}"
        )
    return study_dir


def trial_errors(results: Any) -> list[str]:
    return [f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}" for e in results.errors]


def catch_up(fitter: Any, metrics: pd.DataFrame) -> None:
    """Send the fitter any rows it missed (it de-duplicates by run_id and step)."""
    if len(metrics):
        ray.get(fitter.add_rows.remote(metrics.to_dict("records")), timeout=FITTER_TIMEOUT_S * 4)


def check_model_paths(cfg: Config) -> None:
    """External models must exist where the study runs, before any trial starts."""
    from rayrl.config import ConfigError

    for name in cfg.study.models:
        for family in cfg.study.family:
            spec = cfg.model(name, family)
            if spec.path and not (Path(spec.path).expanduser() / "config.json").exists():
                raise ConfigError(
                    f"{cfg.source}: ladder.models '{name}' ({family}) path {spec.path!r} "
                    "is not a model directory with config.json"
                )
