"""A node leaving mid-trial (a KubeRay worker pod evicted): the trial resumes on another node
from its last checkpoint on the study's storage, its metrics have no gap and no duplicate
step, and the fitter holds every row.

The cluster is ray.cluster_utils.Cluster in this process: a head with no CPUs and two worker
nodes of one run's CPUs each, added one after the other (each waits for its raylet to
register). Nodes started at once in one temp dir race for the same socket names
(sockets/raylet.1, sockets/plasma_store.1: Ray picks the first free name and creates it only
when the raylet binds it); the loser's raylet aborts ("bind: Address already in use") and
its `ray start` then gives up with the other node's raylet, so the study had one node or
none. Every port of every node is given (tests/clusters.py), so another Ray on this machine
never takes one. The GCS health check is relaxed only as far as declaring the killed node
dead within seconds: a busy 2-core machine can leave a live raylet silent for a while."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from clusters import node_port_params

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
# A killed raylet refuses the check at once: dead after 5 failures a second apart. A live
# one that is slow to answer has 5 s a check, so it is never taken for dead.
HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 5,
}


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def node_of(pid: int, nodes: list) -> object | None:
    """The node whose raylet started process pid (a worker: the raylet is its parent)."""
    try:
        chain = [pid, *(p.pid for p in psutil.Process(pid).parents())]
    except psutil.Error:  # gone meanwhile
        return None
    return next((node for node in nodes if raylet_pid(node) in chain), None)


def learners() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "ray::Learner" in " ".join(p.info["cmdline"] or [])
    ]


def alive_nodes(cluster) -> set[str]:
    return {n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]}


@pytest.mark.timeout(420)
def test_a_trial_whose_node_dies_resumes_on_another_node_without_a_gap(tmp_path, monkeypatch):
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster writes and later deletes /tmp/ray/ray_current_cluster, the address file that
    # another Ray on this machine may own: this cluster's address goes to the study alone.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # One run fits a worker node, two do not: the retry can only go to the other node.
    per_node = math.ceil(run_cpus(load_config(ROOT / "configs" / "smoke.yaml", ONE_RUN)))
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # unix socket paths must stay short
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": temp_dir,
            "_system_config": HEALTH_CHECK,
            **node_port_params(head=True),
        },
    )
    study = None
    try:
        workers = [
            cluster.add_node(num_cpus=per_node, temp_dir=temp_dir, **node_port_params())
            for _ in range(2)
        ]
        ids = {w.node_id for w in workers}
        assert ids <= alive_nodes(cluster), "a worker node did not register"
        out = tmp_path / "study"
        sets = [arg for k, v in ONE_RUN.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
        cmd = [sys.executable, "-m", "rayrl.cli", "study", str(ROOT / "configs" / "smoke.yaml")]
        cmd += ["--out", str(out), "--no-scheduler", *sets]
        study = subprocess.Popen(
            cmd,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # The run's first sealed checkpoint, then the node of its learner goes, workers and all.
        deadline = time.time() + 240
        while not list(out.glob("runs/*/checkpoints/step*/manifest.json")):
            assert ids <= alive_nodes(cluster), "a worker node died before the kill"
            assert study.poll() is None, "the study ended before a checkpoint"
            assert time.time() < deadline, "no checkpoint sealed in 240 s"
            time.sleep(0.5)
        victim = next((n for pid in learners() if (n := node_of(pid, workers))), None)
        assert victim is not None, "no learner on a worker node"
        steps_before = pd.read_parquet(next(out.glob("runs/*/metrics.parquet")))["step"].tolist()
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, agents, workers
        output = study.communicate(timeout=240)[0].decode()
        assert study.returncode == 0, output[-3000:]

        # Only the killed node was declared dead: the run finished on the other one.
        survivor = next(w for w in workers if w is not victim)
        assert alive_nodes(cluster) & ids == {survivor.node_id}
        run_dir = next(out.glob("runs/*"))
        evals = pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist()
        steps = [
            json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()
        ]
        assert max(steps_before) < 6, "the run ended before its node was removed"
        assert evals == [0, 2, 4, 6] and steps == [1, 2, 3, 4, 5, 6]  # no gap, none twice
        held = pd.DataFrame(held_on_disk(out / "fitter" / "rows")[0])
        assert sorted(held["step"]) == [0, 2, 4, 6]
        logs = output + "".join(
            p.read_text(errors="replace")
            for p in Path(temp_dir).glob("session_*/logs/worker-*.out")
        )
        # A retry, from a sealed checkpoint (step 2 or 4), not from the start.
        assert "resumed from step 2" in logs or "resumed from step 4" in logs, output[-3000:]
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step4", "step6"]
    except BaseException:  # Ray's logs (raylet.out, gcs_server.out) outlive the temp dir
        for logs_dir in Path(temp_dir).glob("session_*/logs"):
            shutil.copytree(logs_dir, tmp_path / "ray_logs", dirs_exist_ok=True)
        print(f"Ray logs: {tmp_path / 'ray_logs'}")
        raise
    finally:
        if study is not None and study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
        for node in [*cluster.worker_nodes, cluster.head_node]:
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
