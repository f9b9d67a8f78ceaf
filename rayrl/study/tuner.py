"""`rayrl study`: a Ray Tune search over model x family x rollout n x reuse factor x seed.

Each trial is one GRPO run (rayrl.trainer) whose actors live in the trial's placement
group; Tune reuses a finished trial's actor, and with it the run's warm pools, for the
next trial with the same resources. Every metric row goes to the run's own metrics.parquet,
to `tune.report` (so to the scheduler and the trackers, with every optimizer step's stats)
and to the study's own FitterActor. Running the same command again resumes the study: finished trials are
kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.stopper import Stopper

from rayrl.config import Config, dump_config
from rayrl.metrics import (
    EVAL,
    PREDICTED_FINAL,
    STEP,
    SWEEPS,
    TOTAL_STEPS,
    projected_end,
    read_metrics,
    trial_result,
    x_column,
)
from rayrl.pools import WarmPools
from rayrl.storage import OutOfSpace, is_out_of_space
from rayrl.study.resume import check_resume, remaining_trials
from rayrl.trainer import train
from rayrl.trial import COLUMNS, Trial

if TYPE_CHECKING:
    from rayrl.study.scheduler import ScalingLawScheduler

log = logging.getLogger(__name__)
FITTER_TIMEOUT_S = 120.0  # catching up: one call with every row of the study


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


def run_bundles(cfg: Config, models: list[tuple[str, str]] | None = None) -> list[dict[str, float]]:
    """The bundles of the largest run (in CPUs) of `models` (model, family), by default the
    study's."""
    models = models or [(t.model, t.family) for t in cfg.trials()]
    runs = [trial_resources(cfg, m, f).bundles for m, f in models]
    return max(runs, key=lambda b: sum(x.get("CPU", 0.0) for x in b), default=[])


def run_cpus(cfg: Config, models: list[tuple[str, str]] | None = None) -> float:
    """Logical CPUs the largest run of `models` (model, family), by default the study's, reserves."""
    return sum(b.get("CPU", 0.0) for b in run_bundles(cfg, models))


def run_trial(params: dict[str, Any], cfg: Config, study_dir: str) -> None:
    """The Tune trainable: one GRPO run, resumed from its own checkpoint when one exists.

    Every optimizer step and every evaluation row goes to `tune.report` (so to the trackers
    and the scheduler). An evaluation row goes to the study's fitter first, and is reported
    with the run's forecast that the fitter sends back (send_row): the scheduler judges the
    row by it, fresh, without calling the fitter itself, and the live table shows the
    predicted final loss."""
    from rayrl.study.fitter import get_fitter, send_row

    spec, cfg = trial_of(params, cfg)  # the trial, and its variant's config
    fitter = get_fitter(study_dir)
    total_steps = cfg.grpo.steps
    x_col = x_column(cfg.study.x)
    common = {"run_id": spec.run_id, TOTAL_STEPS: total_steps, SWEEPS: ",".join(spec.sweeps)}

    def on_row(row: dict[str, Any]) -> None:
        forecast = send_row(fitter, row)
        extra = {PREDICTED_FINAL: float("nan")}
        if forecast is not None:
            x_end = projected_end(row[x_col], row["step"], total_steps)
            extra = {PREDICTED_FINAL: forecast.at(x_end)["mean"], **forecast.to_result()}
        tune.report(trial_result(EVAL, row, common, **extra))

    def on_step(stats: dict[str, Any]) -> None:
        tune.report(trial_result(STEP, stats, common))

    train(
        cfg,
        spec,
        Path(study_dir) / "runs" / spec.run_id,
        resume=True,
        on_row=on_row,
        on_step=on_step,
        progress=False,
        # The pools of this study's last trial in this Tune actor, which Tune reuses.
        warm=WarmPools.of(study_dir),
    )


def collect_metrics(study_dir: Path) -> pd.DataFrame:
    """All trials' rows, from the runs' own files: the study's source of truth."""
    parts = [read_metrics(p) for p in sorted((study_dir / "runs").glob("*/metrics.parquet"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def make_tuner(cfg: Config, study: Study, trials: list[Trial] | None = None) -> tune.Tuner:
    """A Tuner over `trials` (by default all the study's) with today's scheduler,
    concurrency limit, trackers and reporter.

    A resumed study is a new Tuner over the trials that remain, each resuming from its own
    checkpoint, never Tuner.restore: that brings back the scheduler and callbacks pickled at
    the start, and restarts errored trials all at once, past max_concurrent
    (ray-project/ray#40652)."""
    reporter = tune.CLIReporter(
        metric_columns={
            "step": "step",
            "test_loss": "loss",
            PREDICTED_FINAL: "pred. final",
            "reward_mean": "reward",
        },
        parameter_columns={f"trial/{k}": k for k in COLUMNS},
        max_report_frequency=30,
    )
    return tune.Tuner(
        study.trainable(),
        param_space={
            "trial": tune.grid_search(
                [t.to_params() for t in (cfg.trials() if trials is None else trials)]
            )
        },
        tune_config=tune.TuneConfig(
            scheduler=study.scheduler(),
            search_alg=BasicVariantGenerator(max_concurrent=cfg.study.max_concurrent),
            # A trial whose resources match a finished one's runs in its actor, on its warm
            # pools (rayrl.pools).
            reuse_actors=True,
        ),
        run_config=study.run_config(progress_reporter=reporter),
    )


class StopOnFullDisk(Callback, Stopper):
    """Stops the whole study at a trial's first failure for space (Tune would retry it, then
    run the others, each filling the same disk); `error` is what run_study raises. Both a
    callback (it sees the failure) and the stopper (Tune asks it whether to stop all)."""

    # Tune logs each failure with its traceback; one for space is rayrl's to report, in one line.
    TUNE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state")

    def __init__(self, study_dir: Path) -> None:
        self.study_dir = study_dir
        self.error: OutOfSpace | None = None

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_out_of_space(record.exc_info[1]))

    def setup(self, **info: Any) -> None:
        for name in self.TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self.filter)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for name in self.TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self.filter)

    def _check(self, trial: Any) -> None:
        # The error's text as Tune wrote it on this machine (synced to storage only later).
        try:
            err = Path(trial.error_file).read_text() if trial.error_file else ""
        except OSError:  # an unreadable error is not one for space
            return
        if is_out_of_space(RuntimeError(err)):
            self.error = self.error or OutOfSpace.named_in(err, self.study_dir)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.error is not None


class Study:
    """A study directory with its config, fitter, scheduler and trackers: what `rayrl study`
    runs, and what a Ray Tune user wraps a Tuner of their own in.

        with Study("configs/smoke.yaml", out_dir="runs/api") as study:
            tune.Tuner(study.trainable(), param_space={"model": tune.grid_search([...]),
                       "grpo.lr": tune.loguniform(1e-5, 1e-4)},
                       tune_config=tune.TuneConfig(scheduler=study.scheduler()),
                       run_config=study.run_config()).fit()

    A trial's params are a study trial ({"trial": Trial.to_params()}) or dotted config keys
    beside the trial's own fields (model, family, rollout_n, reuse_factor, seed); the keys
    make the run's variant. Entering starts the fitter (fresh, reloading the study's rows);
    leaving collects metrics.parquet, brings the fitter's fit.json up to date, stops it and
    writes the report, whatever the outcome.
    """

    def __init__(
        self,
        config: Config | str | Path,
        out_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        from rayrl.config import load_config

        self.cfg = config if isinstance(config, Config) else load_config(config, overrides)
        self.dir = Path(out_dir or self.cfg.output_dir).resolve()
        self.fitter: Any = None
        self.full_disk = StopOnFullDisk(self.dir)

    def __enter__(self) -> Study:
        from rayrl.models.external import check_models
        from rayrl.study.fitter import start_fitter

        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        # External models must be usable where the study runs, before any trial starts.
        check_models(cfg, sorted({(t.model, t.family) for t in cfg.trials()}))
        check_resume(cfg, self.dir)  # `rayrl study` asked first, before Ray started
        dump_config(cfg, self.dir / "config.yaml")
        self.fitter = start_fitter(self.dir, x=cfg.study.x, rollout_n=cfg.grpo.rollout_n)
        catch_up(self.fitter, collect_metrics(self.dir))
        # The classic table reporter: the new output engine ignores our live-table columns.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # Only the loggers tracker_callbacks lists: a tracker left out of study.trackers is off.
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        return self

    def trainable(self) -> Any:
        """run_trial bound to this study, each trial in its own placement group."""
        cfg = self.cfg

        def resources(params: dict[str, Any]) -> tune.PlacementGroupFactory:
            t, variant = trial_of(params, cfg)
            return trial_resources(variant, t.model, t.family)

        return tune.with_resources(
            tune.with_parameters(run_trial, cfg=cfg, study_dir=str(self.dir)), resources
        )

    def scheduler(self) -> ScalingLawScheduler:
        """The law scheduler, judging from this study's fitter (study.scheduler false: none
        is stopped, every decision still logged)."""
        from rayrl.study.scheduler import DECISIONS, ScalingLawScheduler

        cfg = self.cfg
        return ScalingLawScheduler(
            self.fitter,
            grace_fraction=cfg.study.scheduler_grace_fraction,
            enabled=cfg.study.scheduler,
            x=cfg.study.x,
            log_path=str(self.dir / DECISIONS),
        )

    def run_config(self, **kwargs: Any) -> tune.RunConfig:
        """Tune's run config for this study: its storage, its trackers, retries after a
        fault; keyword arguments override any of them."""
        from rayrl.study.trackers import tracker_callbacks

        return tune.RunConfig(
            **{
                "name": self.cfg.study.name,
                "storage_path": str(self.dir / "tune"),
                "callbacks": [*tracker_callbacks(self.cfg, self.dir), self.full_disk],
                "stop": self.full_disk,
                "failure_config": tune.FailureConfig(max_failures=2),
                "verbose": 1,
                **kwargs,
            }
        )

    def __exit__(self, *exc: Any) -> None:
        from rayrl.study.fitter import stop_fitter

        try:
            metrics = collect_metrics(self.dir)
            if metrics.empty:
                if exc[0] is None:
                    raise RuntimeError(f"{self.dir}: no trial recorded a metric row")
                return
            metrics.to_parquet(self.dir / "metrics.parquet", index=False)
            catch_up(self.fitter, metrics)
            # The live fit.json's last state: the law the report states, on the same rows.
            ray.get(self.fitter.refit.remote(), timeout=FITTER_TIMEOUT_S)
        finally:
            stop_fitter(self.dir)
        from rayrl.study.report import write_report

        write_report(self.dir)

    @property
    def report(self) -> Path:
        return self.dir / "report.md"


def trial_of(params: dict[str, Any], cfg: Config) -> tuple[Trial, Config]:
    """The trial of a Tune trial's params, with its variant's config: a study's
    ({"trial": ...}), or a user's param space of dotted config keys beside Trial fields (the
    rest default to the variant's config)."""
    if "trial" in params:
        trial = Trial.from_params(params["trial"])
        return trial, cfg.with_overrides(dict(trial.overrides))
    fields = {"model", "family", "rollout_n", "reuse_factor", "seed"}
    overrides = {k: v for k, v in params.items() if k not in fields}
    variant = cfg.with_overrides(overrides)
    g = variant.grpo
    trial = Trial(
        model=params.get("model") or cfg.study.models[0],
        family=params.get("family", cfg.study.family[0]),
        rollout_n=params.get("rollout_n", g.rollout_n),
        reuse_factor=params.get("reuse_factor", g.reuse_factor),
        seed=params.get("seed", g.seed),
        overrides=tuple(sorted(overrides.items())),
    )
    return trial, variant


def run_study(cfg: Config, out_dir: str | None = None) -> Path:
    """Run (or resume) the study over its trials that remain, and write metrics.parquet,
    fit.json and the report."""
    errors: list[Exception] = []
    with Study(cfg, out_dir) as study:
        trials = remaining_trials(cfg, study.dir)
        print(f"{cfg.study.name}: {len(trials)} of {len(cfg.trials())} trials to run", flush=True)
        if trials:
            tuner = make_tuner(cfg, study, trials)
            errors = tuner.fit().errors
    if study.full_disk.error:
        raise study.full_disk.error
    if errors:
        raise RuntimeError(
            f"{len(errors)} trial(s) failed (report written with the rest): {trial_errors(errors)}"
        )
    return study.dir


def trial_errors(errors: list[Exception]) -> list[str]:
    return [f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}" for e in errors]


def catch_up(fitter: Any, metrics: pd.DataFrame) -> None:
    """Send the fitter any rows it missed (it de-duplicates by run_id and step)."""
    if len(metrics):
        ray.get(fitter.add_rows.remote(metrics.to_dict("records")), timeout=FITTER_TIMEOUT_S)
