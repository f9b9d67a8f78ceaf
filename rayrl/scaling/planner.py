"""What a budget should buy (paper eq. 5, 7 and 9).

Eq. 5: N*(C) = argmin_N L(N, C)        a FLOPs budget, the law fitted on compute
Eq. 7: N*(D) = argmin_N L(N, D)        a unique-data budget, the law fitted on data
Eq. 9: tau* at fixed D_total           the largest reuse factor whose final loss is within
                                       noise of tau = 1
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

from rayrl.scaling.fit import MainFit
from rayrl.scaling.laws import k_of_N


def best_size(fit: MainFit, budget: float) -> dict:
    """The fitted size with the lowest predicted L at X = budget, with its interval and how
    often it wins across bootstrap draws."""
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    candidates = []
    for i, N in enumerate(fit.sizes):
        pred = fit.predict(N, budget)
        lo, hi = fit.x_range[i]
        pred.update(model=fit.labels[i], extrapolated=not lo <= budget <= hi)
        candidates.append(pred)
    best = int(np.argmin([c["test_loss"] for c in candidates]))
    if fit.draws:
        d = np.asarray(fit.draws)
        # log L = -k(N) log X + E(N) for every size under every draw; who wins how often.
        logL = np.stack(
            [
                -k_of_N(N, d[:, 0], d[:, 1]) * np.log(budget) + [fit.E(N, b) for b in d]
                for N in fit.sizes
            ]
        )
        wins = np.bincount(np.argmin(logL, axis=0), minlength=len(fit.sizes)) / len(d)
        for c, w in zip(candidates, wins):
            c["p_best"] = float(w)
    return {
        "axis": fit.x_name,
        "budget": float(budget),
        "best": candidates[best],
        "candidates": candidates,
    }


def reuse_study(df: pd.DataFrame, level: float = 0.9) -> dict:
    """Eq. 9 per model size: final loss per reuse factor tau (mean over seeds) against tau = 1.

    A tau is within noise when its final loss exceeds tau = 1's by less than z * SE of the
    difference (one-sided at `level`); tau* is the largest tau with it and every smaller
    tau within noise. SE: seed spread, else the rows' test_loss_se.
    """
    if "reuse_factor" not in df.columns or df["reuse_factor"].nunique() < 2:
        raise ValueError("a reuse study needs runs at two or more reuse_factor values")
    final = df.sort_values("step").groupby("run_id").tail(1)
    z = norm.ppf(level)
    out = []
    for N, runs in final.groupby("n_params"):
        rows = []
        for tau, g in runs.groupby("reuse_factor"):
            if len(g) > 1:
                se = g["test_loss"].std(ddof=1) / np.sqrt(len(g))
            elif "test_loss_se" in g.columns:
                se = float(g["test_loss_se"].iloc[0])
            else:
                se = float("nan")
            rows.append(
                {
                    "tau": float(tau),
                    "test_loss": float(g["test_loss"].mean()),
                    "se": float(se),
                    "n_runs": len(g),
                }
            )
        base = next((r for r in rows if r["tau"] == 1), None)
        if base is None:
            out.append(
                {"n_params": float(N), "error": "no tau = 1 runs to compare with", "taus": rows}
            )
            continue
        tau_star = 1.0
        for r in rows:
            r["delta"] = r["test_loss"] - base["test_loss"]
            r["within_noise"] = (
                bool(r["delta"] <= z * np.hypot(r["se"], base["se"]))
                if r["se"] == r["se"]
                else None
            )
        for r in rows:  # rows are in increasing tau
            if not r["within_noise"]:
                break
            tau_star = r["tau"]
        D_total = (
            runs.groupby("reuse_factor")["data_samples"].max() if "data_samples" in runs else None
        )
        out.append(
            {
                "n_params": float(N),
                "tau_star": tau_star,
                "tau_min_loss": min(rows, key=lambda r: r["test_loss"])["tau"],
                "same_D_total": None if D_total is None else bool(D_total.nunique() == 1),
                "noise_unknown": any(r["within_noise"] is None for r in rows),
                "taus": rows,
            }
        )
    return {"level": level, "sizes": out}
