"""ScalingLawScheduler: the rule alone, then a real Tune run on curves from a known law."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.tune.schedulers import TrialScheduler

from rayrl.metrics import KIND, STEP
from rayrl.scaling.protocols import RunFit
from rayrl.study.fitter import Forecast
from rayrl.study.scheduler import ScalingLawScheduler, decide

STEPS = 20  # law_study.STEPS: each trial reports 20 steps


def fake_predict(table):
    return lambda run_id, x: table.get(run_id)


def test_rule_waits_for_grace_then_stops_only_a_clear_loser():
    preds = {
        "me": {"mean": 0.6, "lo": 0.55, "hi": 0.65},
        "rival": {"mean": 0.4, "lo": 0.35, "hi": 0.45},
    }
    early = decide("me", 2, 10, 2.0, 0.7, 0.25, fake_predict(preds), {"rival": 10.0})
    assert early.action == "continue" and "grace" in early.reason
    d = decide("me", 5, 10, 5.0, 0.7, 0.25, fake_predict(preds), {"rival": 10.0})
    assert d.action == "stop" and d.rival == "rival" and d.x_end == pytest.approx(10.0)
    # overlapping intervals: keep going
    preds["rival"] = {"mean": 0.5, "lo": 0.45, "hi": 0.56}
    assert (
        decide("me", 5, 10, 5.0, 0.7, 0.25, fake_predict(preds), {"rival": 10.0}).action
        == "continue"
    )
    # no rival or no prediction: keep going
    assert decide("me", 5, 10, 5.0, 0.7, 0.25, fake_predict(preds), {}).action == "continue"
    assert (
        decide("me", 5, 10, 5.0, 0.7, 0.25, fake_predict({}), {"rival": 10.0}).action == "continue"
    )


def test_rival_is_judged_at_most_at_its_own_end():
    seen = []

    def predict(run_id, x):
        seen.append((run_id, x))
        return {"mean": 0.5, "lo": 0.5, "hi": 0.5}

    decide("me", 5, 10, 50.0, 0.7, 0.25, predict, {"short": 30.0})
    assert ("short", 30.0) in seen and ("me", 100.0) in seen


def test_scheduler_stops_dominated_trials_keeps_winner_and_saves_compute(tmp_path):
    # Its own process and Ray: a Tune run shares nothing with the session's other actors.
    script = Path(__file__).with_name("law_study.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    on, decisions = result["True"]["last"], result["True"]["decisions"]
    off, off_decisions = result["False"]["last"], result["False"]["decisions"]
    stopped = {d["run_id"] for d in decisions if d["action"] == "stop"}
    assert "big" not in stopped and on["big"]["step"] == STEPS  # the winner runs to the end
    assert stopped, "no dominated trial was stopped"
    assert all(on[m]["step"] < STEPS for m in stopped)
    # every stop names its reason and the predicted-against-observed figures
    for d in decisions:
        if d["action"] == "stop":
            assert d["predicted"] is not None and d["observed"] > 0 and "worse than" in d["reason"]
    spent_on = sum(r["compute_flops"] for r in on.values())
    spent_off = sum(r["compute_flops"] for r in off.values())
    assert spent_on < spent_off
    # with the scheduler off, the stopped trials really did finish worse than the winner
    assert all(off[m]["test_loss"] > off["big"]["test_loss"] for m in stopped)
    assert all(d["action"] == "continue" for d in off_decisions)
    assert any("would stop" in d["reason"] for d in off_decisions)
    # The same decisions as the blocking scheduler made on this study: small and mid stop
    # right after the grace quarter (it stopped both at step 5), big runs to the end.
    assert stopped == {"small", "mid"}
    assert all(on[m]["step"] <= STEPS // 4 + 2 for m in stopped), on


def test_rivals_are_runs_of_the_same_sweep_and_a_shared_baseline_must_lose_in_all(monkeypatch):
    sched = ScalingLawScheduler(fitter=None, grace_fraction=0.25)
    monkeypatch.setattr(sched, "_refresh", lambda: None)
    preds = {
        "big": {"mean": 0.1, "lo": 0.08, "hi": 0.12},  # wins the size sweep
        "small-tau1": {"mean": 0.8, "lo": 0.78, "hi": 0.82},
        "small-tau4": {"mean": 0.8, "lo": 0.78, "hi": 0.82},
    }
    monkeypatch.setattr(sched, "_predict", fake_predict(preds))

    def report(run_id, sweeps, step=10):
        result = {"run_id": run_id, "step": step, "total_steps": 20, "test_loss": 0.8}
        return sched.on_trial_result(None, None, {**result, "compute_flops": 1.0, "sweeps": sweeps})

    report("big", "size")
    # in the reuse sweep only: the big model of the size sweep is no rival
    assert report("small-tau4", "reuse") == TrialScheduler.CONTINUE
    # the tau = 1 baseline loses the size sweep but is not beaten in the reuse sweep
    assert report("small-tau1", "size,reuse") == TrialScheduler.CONTINUE
    # once a reuse rival clearly beats it too, it loses everywhere and stops
    preds["small-tau4"] = {"mean": 0.3, "lo": 0.28, "hi": 0.32}
    report("small-tau4", "reuse", step=11)
    assert report("small-tau1", "size,reuse", step=11) == TrialScheduler.STOP


class Fixed:
    """A forecast that is the same at every X."""

    def __init__(self, mean, half):
        self.mean, self.half = mean, half

    def at(self, x):
        return {"mean": self.mean, "lo": self.mean - self.half, "hi": self.mean + self.half}


@ray.remote(num_cpus=0)
class SlowFitter:
    """Answers a snapshot only after `delay` seconds, as a busy or restarting fitter would."""

    def __init__(self, delay):
        self.delay, self.calls = delay, 0

    def snapshot(self):
        self.calls += 1
        time.sleep(self.delay)
        return {"loser": Fixed(0.8, 0.02), "winner": Fixed(0.2, 0.02)}

    def n_calls(self):
        return self.calls


def test_no_callback_waits_on_a_slow_fitter(ray_session):
    fitter = SlowFitter.remote(3.0)
    # The actor is up before the clock starts: its start (a worker process, seconds on a
    # loaded machine) would otherwise eat the margin of the sleep below.
    assert ray.get(fitter.n_calls.remote()) == 0
    sched = ScalingLawScheduler(fitter, grace_fraction=0.25)

    def report(run_id, step, **extra):
        result = {"run_id": run_id, "step": step, "total_steps": 20, "test_loss": 0.5}
        t0 = time.perf_counter()
        action = sched.on_trial_result(None, None, {**result, "compute_flops": step, **extra})
        return action, time.perf_counter() - t0

    seconds = []
    for step in range(6, 12):
        for run_id in ("winner", "loser"):
            action, took = report(run_id, step)
            seconds.append(took)
            assert action == TrialScheduler.CONTINUE  # no snapshot yet: nothing to judge by
    # step results pass straight through, without even a request
    assert report("loser", 11, **{KIND: STEP})[0] == TrialScheduler.CONTINUE
    time.sleep(3.5)  # the snapshot has arrived by now
    action, took = report("loser", 12)
    seconds.append(took)
    assert action == TrialScheduler.STOP
    assert max(seconds) < 0.5, seconds  # a blocking call would take the fitter's 3 s
    # one request in flight at a time, however many results arrive meanwhile
    assert ray.get(fitter.n_calls.remote()) <= 3


def test_a_result_carrying_its_forecast_is_judged_by_it_at_once(ray_session):
    """The trial waited for its forecast (fitter.send_row): no snapshot is needed, and the
    decision at this very result is the one a blocking query would have made."""
    fitter = SlowFitter.remote(60.0)  # its snapshot never arrives during the test
    sched = ScalingLawScheduler(fitter, grace_fraction=0.25)

    def forecast(run_id, mean):
        fit = RunFit(
            k=0.0,
            k_var=0.0,
            E=math.log(mean),
            xbar=0.0,
            n=6,
            s=0.0,
            s_L=0.01,
            infl=1.0,
            source="run",
        )
        return Forecast(run_id, 1e9, 6, fit).to_result()

    def report(run_id, step, mean):
        result = {"run_id": run_id, "step": step, "total_steps": 20, "test_loss": mean}
        return sched.on_trial_result(
            None, None, {**result, "compute_flops": step, **forecast(run_id, mean)}
        )

    assert report("winner", 6, 0.2) == TrialScheduler.CONTINUE  # no rival yet
    assert report("loser", 6, 0.8) == TrialScheduler.STOP
    assert sched.forecasts["loser"].at(20.0)["mean"] == pytest.approx(0.8)
