"""Benchmark the scaling-law fit (issue 5): one fit over 63 runs x 100 points (target < 1 s)
and a 1,000-draw whole-run bootstrap (target < 60 s), on a synthetic table in the paper's
regime (7 sizes 0.5B-72B, 9 runs each, k_max 0.135, N0 13.1B).

    .venv/bin/python tools/bench_fit.py [--out bench_out/bench_fit.json] [--repeats 5]

Prints one JSON object and writes it to --out; the end-to-end `rayrl fit` run leaves its
fit.json and figures in bench_out/example/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from rayrl.scaling.compare import compare_forms
from rayrl.scaling.document import fit_command
from rayrl.scaling.fit import fit_main_law
from rayrl.scaling.protocols import intra_model
from rayrl.scaling.synthetic import make_metrics
from rayrl.scaling.table import to_points


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds over repeats, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/bench_fit.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    k_max, N0 = 0.135, 13.1e9
    df = make_metrics(k_max=k_max, N0=N0, seeds=9, points=100, sigma=0.01, seed=0)
    p = to_points(df, "compute")
    fit_s, fit = timed(lambda: fit_main_law(p), args.repeats)
    huber_s, _ = timed(lambda: fit_main_law(p, loss="huber"), args.repeats)
    smooth_s, _ = timed(lambda: fit_main_law(p, E_form="smooth"), args.repeats)
    boot_s, boot = timed(lambda: fit_main_law(p, n_boot=1000), 1)
    intra_s, intra = timed(lambda: intra_model(p, 0.25), 1)
    compare_s, compare = timed(lambda: compare_forms(p, 0.25), 1)
    true_final = df.sort_values("step").groupby("run_id")["true_loss"].last()
    # End to end as `rayrl fit METRICS --protocol intra --out fit.json`: 1,000 draws, both axes.
    out_dir = Path(args.out).parent / "example"
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_dir / "metrics.parquet")
    command_s, summary = timed(
        lambda: fit_command(
            str(out_dir / "metrics.parquet"), protocol="intra", out=str(out_dir / "fit.json")
        ),
        1,
    )
    report = {
        "table": {"runs": int(df["run_id"].nunique()), "points": len(p), "points_per_run": 100},
        "fit_seconds": fit_s,
        "fit_target_seconds": 1.0,
        "bootstrap_1000_seconds": boot_s,
        "bootstrap_target_seconds": 60.0,
        "huber_fit_seconds": huber_s,
        "smooth_E_fit_seconds": smooth_s,
        "intra_protocol_seconds": intra_s,
        "compare_forms_seconds": compare_s,
        "fit_command_seconds": command_s,
        # Per family, and across families when there are two or more.
        "figures": [f for fam in summary["families"].values() for f in fam.get("figures", [])]
        + summary.get("figures", []),
        "recovery": {
            "k_max_true": k_max,
            "k_max": fit.k_max,
            "k_max_rel_error": fit.k_max / k_max - 1,
            "N0_true": N0,
            "N0": fit.N0,
            "N0_ratio": fit.N0 / N0,
            "k_max_ci90": boot.ci["k_max"],
            "N0_ci90": boot.ci["N0"],
            "r2": fit.r2,
        },
        "intra_final_max_error_vs_observed": intra["final_max_error"],
        "intra_final_max_error_vs_true": max(
            abs(r["final_pred"] - true_final[r["run_id"]]) for r in intra["runs"]
        ),
        "forms_by_held_out_mae": [(f["form"], f.get("mae")) for f in compare["forms"]],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "pass": fit_s < 1.0 and boot_s < 60.0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
