"""A study on an autoscaling cluster that starts with no worker: the size check asks the
autoscaler for one run, and Tune's requests bring the workers up (Ray's own autoscaler on
its fake multi-node provider, the local stand-in for KubeRay's)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from clusters import free_port, node_ports, stop_head

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
ONE_TRIAL = {
    "study.family": ["base"],
    "study.sweeps": [{"name": "one", "models": ["smoke-1"]}],
    "study.trackers": [],
    "grpo.data_budget": 16,
}


def autoscaling_config(gcs: str) -> dict:
    """A head with no CPU and one worker type of 4 CPUs, none running at the start."""
    return {
        "cluster_name": "rayrl-autoscale",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu4": {
                "resources": {"CPU": 4},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.mark.timeout(1200)
def test_a_study_starts_on_an_autoscaling_cluster_with_no_worker(tmp_path):
    import ray._private.services as services

    bin_dir = Path(sys.executable).parent
    port = free_port()
    gcs = f"{services.get_node_ip_address()}:{port}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_FAKE_CLUSTER": "1",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # unix socket paths must stay short
    head = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}"]
    head += [f"--autoscaling-config={config}", "--num-cpus=0", "--include-dashboard=false"]
    head += ["--disable-usage-stats", f"--temp-dir={temp_dir}", *node_ports(head=True)]
    # --block ties the cluster (and the workers its autoscaler starts) to this process group.
    proc = subprocess.Popen(
        head, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        out = tmp_path / "study"
        sets = [arg for k, v in ONE_TRIAL.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
        cmd = [sys.executable, "-m", "rayrl.cli", "study", str(ROOT / "configs" / "smoke.yaml")]
        cmd += ["--out", str(out), "--no-scheduler", *sets]
        deadline = time.time() + 120
        while True:  # the head answers a while after `ray start` returns
            study = subprocess.run(
                cmd, env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=900
            )
            if "none answered" not in study.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert study.returncode == 0, study.stderr[-3000:]
        assert "asking the autoscaler for one run's" in study.stderr
        df = pd.read_parquet(out / "metrics.parquet")
        assert df["step"].tolist() == [0, 2]
    finally:
        stop_head(proc, temp_dir)
