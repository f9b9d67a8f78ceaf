"""A node leaving mid-trial (a KubeRay worker pod evicted): the trial resumes on another node
from its last checkpoint on the study's storage, its metrics have no gap and no duplicate
step, and the fitter holds every row. Three raylets of this machine, each `ray start
--block` in its own process group (never the session's Ray); the node that hosts the run's
learner is killed with its workers once the run has sealed a checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from clusters import free_port, stop_head

from rayrl.config import load_config
from rayrl.study import run_cpus
from rayrl.study.fitter import held_on_disk

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
ONE_RUN = {
    "study.family": ["base"],
    "study.sweeps": [{"name": "one", "models": ["smoke-1"]}],
    "study.trackers": [],
    "grpo.data_budget": 48,  # 6 steps: evaluations at 0, 2, 4, 6; checkpoints at 2, 4, 6
}
# The GCS declares a silent node dead after about 2 s, not 30.
FAST_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` on ports of its own (not another Ray's on this machine)."""
    args += [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--block", *args],
        env=env,
        start_new_session=True,  # the node and its workers: one process group to kill
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def node_of(pid: int, nodes: list[subprocess.Popen]) -> subprocess.Popen | None:
    """The `ray start` process whose node runs the process pid (its raylet's worker)."""
    try:
        chain = [pid, *(p.pid for p in psutil.Process(pid).parents())]
    except psutil.Error:  # gone meanwhile
        return None
    return next((node for node in nodes if node.pid in chain), None)


def learners() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "ray::Learner" in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.timeout(900)
def test_a_trial_whose_node_dies_resumes_on_another_node_without_a_gap(tmp_path):
    # One run fits a worker node, two do not: the retry can only go to the other node.
    per_node = math.ceil(run_cpus(load_config(ROOT / "configs" / "smoke.yaml", ONE_RUN)))
    env = {**os.environ, **FAST_DEATH, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    import ray._private.services as services

    port = free_port()
    gcs = f"{services.get_node_ip_address()}:{port}"
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # unix socket paths must stay short
    common = [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = start_node(
        ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false", *common], env
    )
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(2):
            workers.append(start_node([f"--address={gcs}", f"--num-cpus={per_node}", *common], env))
        out = tmp_path / "study"
        sets = [arg for k, v in ONE_RUN.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
        cmd = [sys.executable, "-m", "rayrl.cli", "study", str(ROOT / "configs" / "smoke.yaml")]
        cmd += ["--out", str(out), "--no-scheduler", *sets]
        time.sleep(5)  # the raylets register
        # A node that failed to start (its agent's port taken meanwhile) would leave the retry
        # nowhere to go: fail here, not at the timeout.
        assert all(w.poll() is None for w in workers), "a worker node did not start"
        study = subprocess.Popen(
            cmd, env={**env, "RAY_ADDRESS": gcs}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # The run's first sealed checkpoint, then the node of its learner goes, workers and all.
        deadline = time.time() + 400
        while not list(out.glob("runs/*/checkpoints/step*/manifest.json")):
            assert study.poll() is None and time.time() < deadline, "no checkpoint sealed"
            time.sleep(0.2)
        victim = next(n for pid in learners() if (n := node_of(pid, workers)))
        steps_before = pd.read_parquet(next(out.glob("runs/*/metrics.parquet")))["step"].tolist()
        os.killpg(victim.pid, signal.SIGKILL)
        assert all(w.poll() is None for w in workers if w is not victim), "no node left"
        output = study.communicate(timeout=600)[0].decode()
        assert study.returncode == 0, output[-3000:]

        run_dir = next(out.glob("runs/*"))
        evals = pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist()
        steps = [
            json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()
        ]
        assert max(steps_before) < 6, "the run ended before its node was removed"
        assert evals == [0, 2, 4, 6] and steps == [1, 2, 3, 4, 5, 6]  # no gap, none twice
        held = pd.DataFrame(held_on_disk(out / "fitter" / "rows")[0])
        assert sorted(held["step"]) == [0, 2, 4, 6]
        logs = "".join(
            p.read_text(errors="replace")
            for p in Path(temp_dir).glob("session_*/logs/worker-*.out")
        )
        assert "resumed from step " in logs + output  # a retry, from the sealed checkpoint
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step4", "step6"]
    finally:
        for node in [*workers, head]:
            if node.poll() is None:
                stop_head(node, temp_dir)
