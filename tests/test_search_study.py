"""A searched smoke study end to end: 4 variants x 2 sizes, its driver killed and the study
resumed, and the README's Python API block run as written."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rayrl.checkpoint import checkpoint_state
from rayrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
SEARCH = {
    "study.family": ["base"],
    "study.sweeps": [],
    "study.search": {"grpo.clip_high": [0.2, 0.28], "grpo.lr": {"loguniform": [5.0e-5, 5.0e-4]}},
    "study.num_samples": 2,
    "study.trackers": [],
    "grpo.data_budget": 16,  # 2 steps a run: evaluations at 0 and 2
}


def finished_runs(study: Path, steps: int) -> dict[str, float]:
    """run_id -> its metrics file's mtime, for runs checkpointed at their last step."""
    out = {}
    for run in study.glob("runs/*"):
        state = checkpoint_state(run)
        if state is not None and state["step"] >= steps:
            out[run.name] = (run / "metrics.parquet").stat().st_mtime
    return out


@pytest.mark.timeout(1500)
def test_a_search_study_runs_every_variant_at_every_size_and_resumes_the_same_draws(tmp_path):
    study = tmp_path / "study"
    sets = [arg for k, v in SEARCH.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "rayrl.cli", "study", str(SMOKE), "--out", str(study), *sets]
    cmd += ["--num-cpus", "4", "--no-scheduler"]
    cfg = load_config(SMOKE, SEARCH)
    trials = cfg.trials()
    assert len(trials) == 8 and len({t.variant for t in trials}) == 4
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 900
    while time.time() < deadline and len(finished_runs(study, cfg.grpo.steps)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    done = finished_runs(study, cfg.grpo.steps)
    assert 2 <= len(done) < len(trials)
    assert set(done) <= {t.run_id for t in trials}  # the first invocation drew these variants

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(trials) - len(done)} of {len(trials)} trials to run" in again.stdout
    for run_id, mtime in done.items():  # no finished run was run again
        assert (study / "runs" / run_id / "metrics.parquet").stat().st_mtime == mtime
    assert {p.name for p in (study / "runs").iterdir()} == {t.run_id for t in trials}

    df = pd.read_parquet(study / "metrics.parquet")
    assert df.groupby("variant")["model"].nunique().to_dict() == {t.variant: 2 for t in trials}
    fit = json.loads((study / "fit.json").read_text())
    assert sorted(f["variant"] for f in fit["families"].values()) == sorted(
        {t.variant for t in trials}
    )
    report = (study / "report.md").read_text()
    assert "## Variants" in report
    for variant in {t.variant for t in trials}:
        assert variant in report


def readme_block(title: str) -> str:
    """The first ```python block after the README heading `title`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.timeout(900)
def test_the_readme_python_api_block_runs_as_written(tmp_path):
    code = readme_block("## Python API")
    # as written, from the repository root; its study directory goes under tmp_path
    code = code.replace('"runs/api"', repr(str(tmp_path / "api")))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=840
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = tmp_path / "api"
    df = pd.read_parquet(study / "metrics.parquet")
    assert df["model"].nunique() == 2 and df["variant"].nunique() == 2
    assert (study / "fit.json").exists() and (study / "fitter" / "fit.json").exists()
    assert "## Variants" in (study / "report.md").read_text()
