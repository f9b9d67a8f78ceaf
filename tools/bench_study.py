"""Study overhead: the share of the tiny study's wall time spent outside the step loop
(Ray and Tune start-up, actor start-up, the step-0 evaluation, the report), and inside it
outside rollout, reward, learning, sync and evaluation (checkpoints, logging).

By default configs/tiny.yaml, every sweep, as `tools/demo` runs it (the ladder is built
first, outside the timing); --config picks another study, --size-only its size sweep.

    .venv/bin/python tools/bench_study.py [--config configs/smoke.yaml] [--size-only]
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

from bench_common import OUT, ROOT, TINY, machine, write_json  # noqa: E402

WORK = ("time_gen", "time_reward", "time_learn", "time_sync", "time_eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(TINY), help="the study's config (default tiny)")
    ap.add_argument("--size-only", action="store_true", help="the size sweep alone")
    args = ap.parse_args()
    raw = yaml.safe_load(open(args.config).read())
    if args.size_only:
        raw["study"]["sweeps"] = [{"name": "size"}]
    study_dir = OUT / "study"
    shutil.rmtree(study_dir, ignore_errors=True)  # a leftover study would be resumed
    study_dir.mkdir(parents=True)
    cfg_path = study_dir / f"{raw['study']['name']}-bench.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cli = [sys.executable, "-m", "rayrl.cli"]
    subprocess.run([*cli, "models", "build", str(cfg_path)], cwd=ROOT, check=True)
    cmd = [*cli, "study", str(cfg_path), "--out", str(study_dir)]
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
        "study": raw["study"]["name"],
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
        "outside_loop_share": round((wall - in_loop) / wall, 4),
        "target_share": 0.10,
        "machine": machine(),
    }
    print(json.dumps(result), flush=True)
    print(write_json("study", result))


if __name__ == "__main__":
    main()
