"""ScalingLawScheduler: stop Tune trials the fitted law says cannot win.

After a grace fraction of its steps, a trial's final test loss is predicted by the
FitterActor (intra-model protocol, with an interval). The trial is stopped once the
lower end of that interval is above the upper end of the best rival's predicted loss
at the same compute: even its optimistic case loses to another run's pessimistic one.

Rivals are the runs of the same sweep: a reuse or rollout-n sweep compares one model's
settings, so a bigger model winning the size sweep must not stop them. A run in several
sweeps (the shared tau = 1 baseline) is stopped only when it loses in every one of them.

The scheduler never waits on the fitter. It judges from the freshest forecast it holds
for every run (fitter.Forecast), from two sources:
- the result itself: a trial hands its row to the fitter and waits for its run's forecast
  (fitter.send_row) before it reports, so the result carries a forecast on every row up
  to its own (metrics.FORECAST keys), and each rival's latest result carries one up to
  the rival's latest row. The trial waits, Tune's event loop does not, and each decision
  is the one a blocking query at that result would have made.
- the fitter's snapshot (FitterActor.snapshot), asked for without waiting, one request in
  flight, taken when it has arrived: for runs that report no more (finished before a
  resume), or results that carry no forecast (the fitter did not answer the trial in
  time). A snapshot entry replaces a held forecast only when it is fitted on more rows.
A slow or restarting fitter slows trials or delays decisions, never Tune's event loop.
Only evaluation results (metrics.KIND == EVAL) are judged; a trial's step results pass.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from rayrl.metrics import EVAL, KIND, SWEEPS, TOTAL_STEPS, projected_end, x_column
from rayrl.study.fitter import Forecast

log = logging.getLogger(__name__)
DECISIONS = "scheduler.jsonl"  # in the study directory: one Decision per judged eval row


def read_decisions(study_dir: Path) -> list[dict[str, Any]]:
    """The decisions a study's scheduler logged, oldest first ([] before the first)."""
    path = study_dir / DECISIONS
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Decision:
    run_id: str
    step: int
    action: str  # "continue" or "stop"
    reason: str
    x_now: float
    x_end: float  # projected compute (or data) at the trial's last step
    observed: float  # latest test loss
    predicted: float | None = None
    lo: float | None = None
    hi: float | None = None
    rival: str | None = None
    rival_hi: float | None = None


def decide(
    run_id: str,
    step: int,
    total_steps: int,
    x_now: float,
    observed: float,
    grace_fraction: float,
    predict: Any,
    rivals: dict[str, float],
) -> Decision:
    """The rule, free of Ray and Tune so it can be tested alone.

    `predict(run_id, x)` returns {"mean", "lo", "hi"} or None; `rivals` maps other
    runs to their own projected final x (a rival cannot do better than its last step).
    """
    x_end = projected_end(x_now, step, total_steps)
    d = Decision(run_id, step, "continue", "", x_now, x_end, observed)
    if step / total_steps < grace_fraction:
        d.reason = f"within grace ({step}/{total_steps} < {grace_fraction:.0%})"
        return d
    if step >= total_steps:
        d.reason = "finished"
        return d
    me = predict(run_id, x_end)
    if me is None:
        d.reason = "no prediction yet"
        return d
    d.predicted, d.lo, d.hi = me["mean"], me["lo"], me["hi"]
    best = None
    for rival, rival_end in rivals.items():
        pred = predict(rival, min(x_end, rival_end))
        if pred is not None and (best is None or pred["hi"] < best[1]):
            best = (rival, pred["hi"])
    if best is None:
        d.reason = "no rival prediction yet"
        return d
    d.rival, d.rival_hi = best
    if d.lo > d.rival_hi:
        d.action = "stop"
        d.reason = (
            f"predicted final loss >= {d.lo:.4f} (90% lower bound) at x={x_end:.3g}, "
            f"worse than {best[0]}'s upper bound {best[1]:.4f} at the same x"
        )
    else:
        d.reason = (
            f"interval [{d.lo:.4f}, {d.hi:.4f}] still overlaps the best rival ({best[1]:.4f})"
        )
    return d


class ScalingLawScheduler(FIFOScheduler):
    """FIFO scheduling plus law-based early stopping; `enabled=False` only logs.

    `fitter` is the study's FitterActor handle (or anything with snapshot.remote())."""

    def __init__(
        self,
        fitter: Any,
        grace_fraction: float = 0.25,
        enabled: bool = True,
        x: str = "compute",
        log_path: str | None = None,
    ) -> None:
        super().__init__()
        self.fitter = fitter
        self.grace_fraction, self.enabled, self.log_path = grace_fraction, enabled, log_path
        self.x_col = x_column(x)
        self.ends: dict[str, float] = {}  # run_id -> projected final x
        self.sweeps: dict[str, set[str]] = {}  # run_id -> the sweeps it belongs to
        self.forecasts: dict[str, Forecast] = {}  # run_id -> the freshest forecast held
        self._pending: ray.ObjectRef | None = None

    def __getstate__(self) -> dict:
        # Tune pickles the scheduler with the experiment; a request in flight stays behind.
        return {**self.__dict__, "_pending": None}

    def _refresh(self) -> None:
        """Take the fitter's snapshot if it has arrived, and ask for the next; never waits."""
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                return
            try:
                snapshot = ray.get(self._pending)  # ready: returns at once
            except Exception as e:  # noqa: BLE001 - a failed fitter call never fails the study
                log.warning("scheduler: fitter snapshot failed (%s); keeping the last one", e)
                snapshot = {}
            for run_id, forecast in snapshot.items():
                held = self.forecasts.get(run_id)
                if held is None or forecast.n_points > held.n_points:
                    self.forecasts[run_id] = forecast
            self._pending = None
        self._pending = self.fitter.snapshot.remote()

    def _predict(self, run_id: str, x_end: float) -> dict | None:
        forecast = self.forecasts.get(run_id)
        return forecast.at(x_end) if forecast is not None else None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(KIND, EVAL) != EVAL or "run_id" not in result or TOTAL_STEPS not in result:
            return TrialScheduler.CONTINUE
        self._refresh()
        run_id, step, total = result["run_id"], int(result["step"]), int(result[TOTAL_STEPS])
        reported = Forecast.from_result(run_id, result)
        if reported is not None:  # fitted on every row up to this one: the freshest there is
            self.forecasts[run_id] = reported
        x_now = float(result[self.x_col])
        if step > 0:
            self.ends[run_id] = projected_end(x_now, step, total)
        # Results without sweep names (a plain Tune trainable) form one sweep together.
        mine = self.sweeps.setdefault(run_id, set(str(result.get(SWEEPS, "")).split(",")))
        decisions = [
            decide(
                run_id,
                step,
                total,
                x_now,
                float(result["test_loss"]),
                self.grace_fraction,
                self._predict,
                {
                    r: e
                    for r, e in self.ends.items()
                    if r != run_id and sweep in self.sweeps.get(r, set())
                },
            )
            for sweep in sorted(mine)
        ]
        # Stop only when it loses in every sweep; report the first reason it stays otherwise.
        stays = [x for x in decisions if x.action != "stop"]
        d = stays[0] if stays else decisions[0]
        if d.action == "stop" and not self.enabled:
            d.action, d.reason = "continue", "scheduler off; would stop: " + d.reason
        if self.log_path and step > 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"time": time.time(), **asdict(d)}) + "\n")
        if d.action == "stop":
            log.info("scheduler stops %s at step %d: %s", run_id, step, d.reason)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
