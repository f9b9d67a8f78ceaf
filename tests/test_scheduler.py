"""ScalingLawScheduler: the rule alone, then a real Tune run on curves from a known law."""

import json

import numpy as np
import pytest

from rayrl.scaling.laws import k_of_N
from rayrl.scaling.scheduler import ScalingLawScheduler, decide


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


# Curves of a known law: log L = -k(N) log C + E(N); bigger models win at equal compute.
SIZES = {"small": 0.5e9, "mid": 3e9, "big": 14e9}
STEPS = 20


def law_trainable(config):
    from ray import tune

    from rayrl.scaling.fitter import get_or_create_fitter

    name, N = config["model"], SIZES[config["model"]]
    fitter = get_or_create_fitter(config["fitter"], config["out"])
    rng = np.random.default_rng(int(N) % 1000)
    k = k_of_N(N, 0.15, 10e9)
    E = {"small": -0.05, "mid": -0.25, "big": -0.55}[name] + k * np.log(1e18)
    for step in range(1, STEPS + 1):
        C = 6 * N * 2e5 * step
        L = float(np.exp(-k * np.log(C) + E) + 0.003 * rng.standard_normal())
        row = {
            "run_id": name,
            "family": "law",
            "model": name,
            "n_params": N,
            "step": step,
            "compute_flops": C,
            "data_samples": 512 * step,
            "unique_samples": 512 * step,
            "rollout_n": 8,
            "reuse_factor": 1,
            "seed": 0,
            "test_loss": L,
            "test_loss_se": 0.003,
        }
        import ray

        ray.get(fitter.add_rows.remote([row]))
        tune.report({**row, "total_steps": STEPS})


def run_law_study(tmp_path, enabled):
    from ray import tune

    sched = ScalingLawScheduler(
        fitter_name=f"law-{enabled}",
        grace_fraction=0.25,
        enabled=enabled,
        log_path=str(tmp_path / f"sched-{enabled}.jsonl"),
    )
    trainable = tune.with_resources(law_trainable, {"cpu": 0.5})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "model": tune.grid_search(list(SIZES)),
            "fitter": f"law-{enabled}",
            "out": str(tmp_path / f"fitter-{enabled}"),
        },
        tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=3),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"), name=f"law-{enabled}", verbose=0
        ),
    )
    results = tuner.fit()
    last = {r.config["model"]: r.metrics for r in results}
    decisions = [
        json.loads(x) for x in (tmp_path / f"sched-{enabled}.jsonl").read_text().splitlines()
    ]
    return last, decisions


def test_scheduler_stops_dominated_trials_keeps_winner_and_saves_compute(ray_session, tmp_path):
    on, decisions = run_law_study(tmp_path, enabled=True)
    off, off_decisions = run_law_study(tmp_path, enabled=False)
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
