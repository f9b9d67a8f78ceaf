"""tools/bench's own plumbing: a failed section fails the suite, and the GRPO section
accepts whichever ladder model it finds."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def report(out: Path, sections: str) -> subprocess.CompletedProcess:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / "sections.txt").write_text(sections)
    env = {**os.environ, "RAYRL_BENCH_OUT": str(out)}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_report.py"), "--total-seconds", "13"],
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_failed_section_fails_the_bench(tmp_path):
    ok = report(tmp_path / "ok", "peak 0 3\nfit 0 10\n")
    assert ok.returncode == 0, ok.stderr
    assert "Failed" not in (tmp_path / "ok" / "bench.md").read_text()
    bad = report(tmp_path / "bad", "peak 0 3\ngrpo 1 10\n")
    assert bad.returncode == 1
    assert "Failed sections: grpo" in (tmp_path / "bad" / "bench.md").read_text()
    # tools/bench ends with the report, so its exit status is the report's
    assert (
        (ROOT / "tools" / "bench")
        .read_text()
        .rstrip()
        .splitlines()[-1]
        .startswith("$PY tools/bench_report.py")
    )


def test_grpo_section_runs_a_ladder_model_from_any_config(tmp_path):
    from bench_common import BenchModel
    from bench_grpo import SETTINGS, config

    # tiny-5 is in tiny.yaml, not in the smoke config the section starts from
    model = BenchModel("tiny-5", str(tmp_path / "tiny-5"), 1, trained=True)
    cfg = config(model, tmp_path)
    assert [m.name for m in cfg.ladder.models] == ["tiny-5"]
    assert cfg.ladder.models[0].path == model.path
    assert [t.model for t in cfg.trials()] == ["tiny-5"]
    # like for like with TRL: the KL coefficient its side gets as beta; 4 updates a step
    assert cfg.grpo.kl_coef == SETTINGS["kl"] > 0
    assert config(model, tmp_path, updates=4).grpo.mini_batches == 4
