"""Benchmark the live fitter under load (issue 33): `--writers` threads stream the rows of
`--runs` runs (the paper's 7 sizes, `--points` evaluations each, one row per call as a
trial sends them) to one FitterActor while it is killed `--kills` times; at each scale it
reports ingest rows/s, the seconds of one full refit and the actor's resident memory, and
checks that every acknowledged row is held exactly once.

    .venv/bin/python tools/bench_fitter.py [--runs 10,100,1000] [--points 100] [--writers 32]
        [--kills 2] [--out bench_out/bench_fitter.json]

A row is acknowledged when its add_rows call returns; a call caught by a kill is retried by
Ray (the actor's max_task_retries), and its rows are keyed by (run_id, step), so a retry
never duplicates one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from rayrl.scaling.synthetic import PAPER_SIZES, make_metrics
from rayrl.study.fitter import start_fitter, stop_fitter

KEY = ["run_id", "step"]


def actor_rss(handle: ray.actor.ActorHandle) -> int:
    """Resident bytes of the actor's process (on this machine)."""
    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return psutil.Process(pid).memory_info().rss


def one_scale(runs: int, points: int, writers: int, kills: int) -> dict:
    seeds = max(1, round(runs / len(PAPER_SIZES)))
    df = make_metrics(seeds=seeds, points=points, seed=0)
    df = df[[c for c in df.columns if c != "true_loss"]]
    rows = df.sort_values(["step", "run_id"]).to_dict("records")  # runs advance together
    by_writer = [rows[w::writers] for w in range(writers)]
    study = Path(tempfile.mkdtemp(prefix="bench-fitter-"))
    fitter = start_fitter(study)
    acked: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[str] = []

    def write(mine: list[dict]) -> None:
        for row in mine:
            try:
                ray.get(fitter.add_rows.remote([row]))
            except Exception as e:  # noqa: BLE001 - counted, the bench goes on
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                acked.append((row["run_id"], int(row["step"])))

    threads = [threading.Thread(target=write, args=(m,)) for m in by_writer]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    killed_at = []
    for k in range(1, kills + 1):  # at even shares of the stream
        while len(acked) < len(rows) * k / (kills + 1) and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        ray.kill(fitter, no_restart=False)
        killed_at.append(len(acked))
    while any(t.is_alive() for t in threads):  # progress: a rate even from a run cut short
        time.sleep(30)
        elapsed = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "runs": runs,
                    "acknowledged": len(acked),
                    "seconds": round(elapsed),
                    "rows_per_s": round(len(acked) / elapsed, 1),
                }
            ),
            flush=True,
        )
    ingest_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = ray.get(fitter.refit.remote())
    refit_s = time.perf_counter() - t1
    held = ray.get(fitter.rows.remote())
    rss = actor_rss(fitter)
    stop_fitter(study)
    held_keys = [(r["run_id"], int(r["step"])) for r in held]
    return {
        "runs": int(df["run_id"].nunique()),
        "rows": len(rows),
        "writers": writers,
        "killed_after_rows": killed_at,
        "ingest_seconds": ingest_s,
        "ingest_rows_per_s": len(rows) / ingest_s,
        "refit_seconds": refit_s,
        "fit_status": summary.get("status"),
        "fitter_rss_mib": rss / 2**20,
        "acknowledged": len(acked),
        "held": len(held_keys),
        "errors": errors[:5],
        "exactly_once": len(set(held_keys)) == len(held_keys) and set(held_keys) == set(acked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="10,100,1000", help="scales, comma-separated")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--out", default="bench_out/bench_fitter.json")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    scales = []
    for runs in (int(r) for r in args.runs.split(",")):
        scales.append(one_scale(runs, args.points, args.writers, args.kills))
        print(json.dumps(scales[-1]), flush=True)
    report = {
        "scales": scales,
        "refit_growth": [
            (s["runs"], s["refit_seconds"] / scales[0]["refit_seconds"]) for s in scales
        ],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "pass": all(s["exactly_once"] and s["acknowledged"] == s["rows"] for s in scales),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "scales"}, indent=1))


if __name__ == "__main__":
    main()
