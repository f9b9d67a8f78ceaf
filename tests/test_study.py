"""The smoke study end to end: Tune, the FitterActor, faults, resume, report, and `ray job submit`."""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from clusters import free_ports, stop_head

from rayrl.config import load_config
from rayrl.scaling.document import fit_table
from rayrl.scaling.table import law_rows
from rayrl.study.fitter import Fitter, get_fitter
from rayrl.study.tuner import run_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
# The job-submit test's study: one trial of 2 steps (that test is about the submission path).
ONE_TRIAL = {
    "study.family": ["base"],
    "study.sweeps": [{"name": "one", "models": ["smoke-1"]}],
    "grpo.data_budget": 16,
}


def wait_for(predicate, timeout=300.0, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = predicate()
        except Exception:  # noqa: BLE001 - the thing is not there yet
            found = None
        if found:
            return found
        time.sleep(every)
    raise TimeoutError


def saboteur(cfg, study_dir, log):
    """Kill the FitterActor once it holds rows, then one trial's rollout actor mid-run."""
    fitter = wait_for(lambda: get_fitter(study_dir))
    wait_for(lambda: len(ray.get(fitter.rows.remote())) >= 2)
    ray.kill(fitter, no_restart=False)
    log.append("fitter")
    run_id = cfg.trials()[1].run_id  # the second trial, after the fitter came back
    metrics = study_dir / "runs" / run_id / "metrics.parquet"
    wait_for(lambda: metrics.exists() and pd.read_parquet(metrics)["step"].max() >= 2)
    # Its rollout worker, named by the run that started the pool (a warm pool is reused).
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("rollout:")
    ]
    ray.kill(ray.get_actor(name, namespace="rayrl"))
    log.append(run_id)


def law_summary(fam: dict) -> dict:
    """What a fit.json states of one family's law: its runs, points and parameters."""
    laws = {
        axis: (law["k_max"], law["N0"], law["n_points"], law["n_runs"], law["sizes"])
        for axis, law in fam["laws"].items()
    }
    runs = [(r["run_id"], r["n_points"], r.get("k")) for r in fam.get("runs", [])]
    return {"laws": laws, "runs": runs, "excluded": fam.get("excluded_rows")}


def test_smoke_study_survives_faults_resumes_and_reports(ray_session, tmp_path):
    cfg = load_config(SMOKE)
    study_dir = tmp_path / "study"
    killed: list[str] = []
    thread = threading.Thread(target=saboteur, args=(cfg, study_dir, killed), daemon=True)
    thread.start()
    run_study(cfg, out_dir=str(study_dir))
    thread.join(timeout=5)
    assert killed[0] == "fitter" and len(killed) == 2, killed

    df = pd.read_parquet(study_dir / "metrics.parquet")
    trials = cfg.trials()
    assert df["run_id"].nunique() == len(trials)
    assert not df.duplicated(["run_id", "step"]).any()
    steps = cfg.grpo.data_budget // cfg.grpo.prompts_per_step
    expected = list(range(0, steps + 1, cfg.grpo.eval_every))
    decisions = [json.loads(x) for x in (study_dir / "scheduler.jsonl").read_text().splitlines()]
    stops = {d["run_id"]: d["step"] for d in decisions if d["action"] == "stop"}
    for run_id, g in df.groupby("run_id"):
        steps = sorted(g["step"])
        # every trial ran to its end, or to the step where the scheduler stopped it
        last = stops.get(run_id, expected[-1])
        assert steps == [s for s in expected if s <= last], (run_id, steps, stops)
    # the trial whose rollout actor was killed at step >= 2 went on past it
    assert max(df[df["run_id"] == killed[1]]["step"]) >= 4
    # the fitter came back and kept every row (none lost when it died); the study stopped it
    with pytest.raises(ValueError):
        get_fitter(study_dir)
    held = pd.DataFrame(Fitter(str(study_dir / "fitter"), min_interval_s=3600).rows())
    assert set(zip(held["run_id"], held["step"])) == set(zip(df["run_id"], df["step"]))

    # both families in one study, fitted apart: each as fitted on its own rows alone
    fit = json.loads((study_dir / "fit.json").read_text())
    assert sorted(fit["families"]) == ["base", "instruct"] == sorted(df["family"].unique())
    # one law: the live fitter's last fit.json and the report's take the same rows (tau = 1 at
    # the main n; the rollout sweep's n = 2 run is left out of both) and state the same law
    live = json.loads((study_dir / "fitter" / "fit.json").read_text())
    assert live["rows"] == fit["rows"] and fit["rows"]["rollout_n"] == cfg.grpo.rollout_n
    assert "rollout_n != 4" in fit["rows"]["excluded"]
    for family in fit["families"]:
        assert law_summary(live["families"][family]) == law_summary(fit["families"][family])
    scaling, _ = law_rows(df, cfg.grpo.rollout_n)
    for family, rows in scaling.groupby("family"):
        alone = fit_table(rows, protocol="inter", n_boot=0)[0]["families"][family]
        mine = fit["families"][family]
        assert mine["status"] == alone["status"]
        assert [(r["run_id"], r.get("k")) for r in mine.get("runs", [])] == [
            (r["run_id"], r.get("k")) for r in alone.get("runs", [])
        ]
        assert {r["run_id"] for r in mine.get("runs", [])} == set(rows["run_id"])

    report = (study_dir / "report.md").read_text()
    assert "### Family base" in report and "### Family instruct" in report
    for figure in ("reuse.png", "rollout_n.png"):
        assert f"]({figure})" in report and (study_dir / figure).stat().st_size > 1000
    assert "## Scheduler" in report and "## Planner" in report

    # TensorBoard (on by default) and MLflow's reader see every trial
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((study_dir / "tune" / cfg.study.name).glob("*/events.out.tfevents.*"))
    assert len(events) == len(trials)
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        assert "ray/tune/test_loss" in acc.Tags()["scalars"]
        assert "ray/tune/reward_mean" in acc.Tags()["scalars"]  # step rows too
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file-store opt-in

    client = MlflowClient(tracking_uri=(study_dir / "mlflow").as_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.study.name).experiment_id])
    assert len(runs) == len(trials)
    assert {r.data.params["trial/family"] for r in runs} == {"base", "instruct"}

    # running it again resumes: nothing recomputed, nothing duplicated
    before = (study_dir / "metrics.parquet").read_bytes()
    run_study(cfg, out_dir=str(study_dir))
    again = pd.read_parquet(study_dir / "metrics.parquet")
    assert len(again) == len(df) and not again.duplicated(["run_id", "step"]).any()
    assert before == (study_dir / "metrics.parquet").read_bytes()


@pytest.mark.timeout(1200)
def test_smoke_study_through_ray_job_submit_on_a_local_head(tmp_path):
    bin_dir = Path(sys.executable).parent
    # Token auth on, as Ray 2.59+ has it by default for a local `ray start --head`: the CLI
    # client must set RAY_AUTH_MODE=token too (README, deploy/README.md). The token lives in
    # tmp_path rather than ~/.ray/auth_token so that the test owns it.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # unix socket paths must stay short
    # Every port free and explicit: Ray's defaults (the agent's 52365, ...) are taken by the
    # test session's own Ray, and a head whose agent cannot bind never accepts a job.
    port, gcs_port, *agent_ports = free_ports(8)
    head = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "4",
        "--port",
        str(gcs_port),
        "--dashboard-port",
        str(port),
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        *(
            arg
            for flag, p in zip(
                (
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port",
                    "--metrics-export-port",
                    "--ray-client-server-port",
                    "--node-manager-port",
                ),
                agent_ports,
            )
            for arg in (flag, str(p))
        ),
        "--temp-dir",
        temp_dir,
    ]
    # --block ties the local cluster to this process group, so tearing it down cannot touch
    # the test session's own Ray (`ray stop` would kill every Ray on the machine).
    proc = subprocess.Popen(
        head, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [str(bin_dir / "ray"), "job", "list", "--address", address],
                    env=env,
                    capture_output=True,
                    timeout=60,
                ).returncode
                == 0
            ),
            timeout=180,
        )
        # Auth is really on: a client that sends no token is turned away.
        anonymous = subprocess.run(
            [str(bin_dir / "ray"), "job", "list", "--address", address],
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert anonymous.returncode != 0, anonymous.stdout
        assert "authentication" in (anonymous.stdout + anonymous.stderr).lower()
        out = tmp_path / "study"
        job_id = f"rayrl-smoke-{os.getpid()}"

        def ray_job(verb: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            cmd = [str(bin_dir / "ray"), "job", verb, "--address", address, *args]
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

        submit = [
            "--no-wait",
            "--submission-id",
            job_id,
            "--working-dir",
            str(ROOT),
            "--runtime-env",
            str(ROOT / "deploy" / "runtime_env.yaml"),
            "--",
            "rayrl",
            "study",
            "configs/smoke.yaml",
            "--out",
            str(out),
            "--no-scheduler",
            *(arg for k, v in ONE_TRIAL.items() for arg in ("--set", f"{k}={json.dumps(v)}")),
        ]
        for _ in range(60):  # the job agent comes up a while after the dashboard answers
            job = ray_job("submit", *submit)
            if "No available agent" not in job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

        def finished() -> str | None:
            status = ray_job("status", job_id).stdout.lower()  # "Job '<id>' succeeded", ...
            return next((s for s in ("succeeded", "failed", "stopped") if s in status), None)

        try:
            final = wait_for(finished, timeout=780, every=3)
        except TimeoutError:
            final = "still running after 13 min"
        logs = ray_job("logs", job_id).stdout
        assert final == "succeeded", f"job {final}; its log ends:\n{logs[-4000:]}"
        assert (out / "report.md").exists()
        df = pd.read_parquet(out / "metrics.parquet")
        assert df["run_id"].nunique() == len(load_config(SMOKE, ONE_TRIAL).trials()) == 1
    finally:
        stop_head(proc, temp_dir)
