"""ScalingLawScheduler: stop Tune trials the fitted law says cannot win.

After a grace fraction of its steps, a trial's final test loss is predicted by the
FitterActor (intra-model protocol, with an interval). The trial is stopped once the
lower end of that interval is above the upper end of the best rival's predicted loss
at the same compute: even its optimistic case loses to another run's pessimistic one.

Rivals are the runs of the same sweep: a reuse or rollout-n sweep compares one model's
settings, so a bigger model winning the size sweep must not stop them. A run in several
sweeps (the shared tau = 1 baseline) is stopped only when it loses in every one of them.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

log = logging.getLogger(__name__)


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
    x_end = x_now * total_steps / max(step, 1)  # compute grows linearly in steps
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
    """FIFO scheduling plus law-based early stopping; `enabled=False` only logs."""

    def __init__(
        self,
        fitter_name: str,
        grace_fraction: float = 0.25,
        enabled: bool = True,
        x: str = "compute",
        log_path: str | None = None,
        namespace: str = "rayrl",
    ) -> None:
        super().__init__()
        self.fitter_name, self.namespace = fitter_name, namespace
        self.grace_fraction, self.enabled, self.log_path = grace_fraction, enabled, log_path
        self.x_col = "compute_flops" if x == "compute" else "data_samples"
        self.ends: dict[str, float] = {}  # run_id -> projected final x
        self.sweeps: dict[str, set[str]] = {}  # run_id -> the sweeps it belongs to
        self.stopped: set[str] = set()

    def _predict(self, run_id: str, x_end: float) -> dict | None:
        try:
            fitter = ray.get_actor(self.fitter_name, namespace=self.namespace)
            return ray.get(fitter.predict_final.remote(run_id, x_end), timeout=30)
        except Exception as e:  # noqa: BLE001 - a missing fitter never fails the study
            log.warning("scheduler: no prediction for %s (%s)", run_id, e)
            return None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "run_id" not in result or "total_steps" not in result:
            return TrialScheduler.CONTINUE
        run_id, step, total = result["run_id"], int(result["step"]), int(result["total_steps"])
        x_now = float(result[self.x_col])
        if step > 0:
            self.ends[run_id] = x_now * total / step
        # Results without sweep names (a plain Tune trainable) form one sweep together.
        mine = self.sweeps.setdefault(run_id, set(str(result.get("sweeps", "")).split(",")))
        predict = functools.cache(self._predict)  # one fitter call per run, however many sweeps
        decisions = [
            decide(
                run_id,
                step,
                total,
                x_now,
                float(result["test_loss"]),
                self.grace_fraction,
                predict,
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
            self.stopped.add(run_id)
            log.info("scheduler stops %s at step %d: %s", run_id, step, d.reason)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
