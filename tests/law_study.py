"""A Tune study on curves of a known law, run in a fresh process with its own Ray:
`python tests/law_study.py OUT_DIR` writes OUT_DIR/result.json for test_scheduler.py."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from rayrl.metrics import TOTAL_STEPS
from rayrl.scaling.laws import k_of_N
from rayrl.study.fitter import start_fitter, stop_fitter
from rayrl.study.scheduler import ScalingLawScheduler

# Curves of a known law: log L = -k(N) log C + E(N); bigger models win at equal compute.
SIZES = {"small": 0.5e9, "mid": 3e9, "big": 14e9}
STEPS = 20  # test_scheduler.STEPS mirrors this
STEP_S = 0.25  # a step's wall time: trials overlap as a study's do, whose steps take seconds


def start_together(study: Path, name: str, timeout_s: float = 120.0) -> None:
    """Wait until every size's trial has started, so they run side by side from step 1.

    Tune starts trials one after another; with steps of milliseconds the first would be
    judged (and done) before its rivals reported anything. The blocking scheduler hid
    this by holding every trial at each report while it called the fitter."""
    started = study / "started"
    started.mkdir(parents=True, exist_ok=True)
    (started / name).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(started.iterdir())) < len(SIZES):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sorted(p.name for p in started.iterdir())} started")
        time.sleep(0.05)


def law_trainable(config):
    from ray import tune

    from rayrl.study.fitter import get_fitter, send_row

    name, N = config["model"], SIZES[config["model"]]
    fitter = get_fitter(config["study"])
    start_together(Path(config["study"]), name)
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
        forecast = send_row(fitter, row, timeout_s=120)  # as rayrl.study.run_trial does
        tune.report({**row, TOTAL_STEPS: STEPS, **(forecast.to_result() if forecast else {})})
        time.sleep(STEP_S)


def run_law_study(tmp_path: Path, enabled: bool):
    from ray import tune

    study = tmp_path / f"law-{enabled}"
    fitter = start_fitter(study)
    sched = ScalingLawScheduler(
        fitter,
        grace_fraction=0.25,
        enabled=enabled,
        log_path=str(tmp_path / f"sched-{enabled}.jsonl"),
    )
    trainable = tune.with_resources(law_trainable, {"cpu": 0.5})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "model": tune.grid_search(list(SIZES)),
            "study": str(study),
        },
        tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=3),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"), name=f"law-{enabled}", verbose=0
        ),
    )
    results = tuner.fit()
    stop_fitter(study)
    last = {r.config["model"]: r.metrics for r in results}
    decisions = [
        json.loads(x) for x in (tmp_path / f"sched-{enabled}.jsonl").read_text().splitlines()
    ]
    return last, decisions


def main(out: Path) -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}},
    )
    result = {}
    for enabled in (True, False):
        last, decisions = run_law_study(out, enabled)
        result[str(enabled)] = {"last": last, "decisions": decisions}
    (out / "result.json").write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
