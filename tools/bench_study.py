"""Study overhead: the share of a smoke study's wall time spent outside rollout, reward,
learning, sync and evaluation (Ray and Tune start-up, actor start-up, scheduling,
checkpoints, logging, the report).

By default the smoke config's size sweep only (2 trials, 8 steps each) to fit the suite's
time budget; --full runs every sweep of configs/smoke.yaml.

    .venv/bin/python tools/bench_study.py [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import OUT, ROOT, SMOKE, machine, write_json  # noqa: E402

WORK = ("time_gen", "time_reward", "time_learn", "time_sync", "time_eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every sweep of smoke.yaml")
    args = ap.parse_args()
    raw = yaml.safe_load(SMOKE.read_text())
    if not args.full:
        raw["study"]["sweeps"] = [{"name": "size"}]
    study_dir = OUT / "study"
    shutil.rmtree(study_dir, ignore_errors=True)  # a leftover study would be resumed
    study_dir.mkdir(parents=True)
    cfg_path = study_dir / "smoke-bench.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "rayrl.cli", "study", str(cfg_path), "--out", str(study_dir)]
    cmd += ["--num-cpus", "4"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (study_dir / "study.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"rayrl study failed ({proc.returncode}); see {study_dir}/study.log")
    steps = [
        json.loads(line)
        for path in sorted((study_dir / "runs").glob("*/steps.jsonl"))
        for line in path.read_text().splitlines()
    ]
    work = {k.removeprefix("time_"): sum(s.get(k, 0.0) for s in steps) for k in WORK}
    in_loop = sum(s["wall"] for s in steps)
    total_work = sum(work.values())
    result = {
        "trials": len(list((study_dir / "runs").glob("*/steps.jsonl"))),
        "steps": len(steps),
        "wall_seconds": round(wall, 1),
        "work_seconds": {k: round(v, 2) for k, v in work.items()},
        "overhead_seconds": round(wall - total_work, 1),
        "overhead_share": round((wall - total_work) / wall, 4),
        # Where it goes: inside the step loop (checkpoints, logging) vs outside it
        # (Ray/Tune and actor start-up, the step-0 evaluation, the report).
        "in_loop_overhead_seconds": round(in_loop - total_work, 1),
        "outside_loop_seconds": round(wall - in_loop, 1),
        "target_share": 0.10,
        "machine": machine(),
    }
    print(json.dumps(result), flush=True)
    print(write_json("study", result))


if __name__ == "__main__":
    main()
