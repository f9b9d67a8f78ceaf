"""The paper's extrapolation protocols (section 2), scored on held-out points.

Intra-model: fit the first fraction of every run, predict the rest of each run.
Inter-model: fit every size but the largest, predict the largest size's k and curve.
Both report MAE and max error on held-out L and how often the interval covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from rayrl.scaling.bootstrap import percentile_ci
from rayrl.scaling.fit import (
    MIN_RUN_POINTS,
    FitError,
    MainFit,
    ar1_inflation,
    centred,
    fit_main_law,
    run_sums,
)
from rayrl.scaling.table import Points

MIN_OWN_NOISE = 5  # below this many points a run borrows the cross-run residual SD
MIN_BOOT_RUNS = 3  # runs a size needs before a whole-run bootstrap sees its spread


@dataclass
class RunFit:
    """One run's log L = -k log X + E, possibly shrunk toward a k(N) prior."""

    k: float
    k_var: float
    E: float
    xbar: float
    n: int
    s: float  # residual SD of log L
    s_L: float  # residual SD of L: evaluation noise is additive on L, not on log L
    infl: float  # variance inflation for autocorrelated residuals
    source: str  # "run", "run+prior" or "prior"

    def predict(self, X, level: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """L at X with a prediction interval for a new evaluation (law uncertainty + noise)."""
        x = np.log(np.asarray(X, dtype=float))
        L = np.exp(-self.k * x + self.E)
        var_log = self.infl * self.s**2 / self.n + (x - self.xbar) ** 2 * self.k_var
        half = norm.ppf(0.5 + level / 2) * np.sqrt(L**2 * var_log + self.s_L**2)  # delta method
        return L, L - half, L + half


def fit_run(
    X: np.ndarray, L: np.ndarray, law: MainFit | None = None, N: float | None = None
) -> RunFit:
    """Least squares on one run's points (in step order), leaning on the cross-run law if given.

    With a law, the slope is the precision-weighted blend of the run's own slope and the
    prior k(N) (sd: between-run spread plus the error in k(N)), so a run with few points
    leans on k(N) and a long run on itself; the law also supplies the residual
    autocorrelation and, for runs too short to show it, the noise level.
    """
    x, y = np.log(np.asarray(X, dtype=float)), np.log(np.asarray(L, dtype=float))
    n = len(x)
    if n == 0 or (law is None and n < MIN_RUN_POINTS):
        raise FitError(f"a run needs {MIN_RUN_POINTS} points without a cross-run law; got {n}")
    xbar, ybar = x.mean(), y.mean()
    Sxx = np.sum((x - xbar) ** 2)
    own = n >= MIN_RUN_POINTS and Sxx > 0
    if not own and law is None:  # e.g. every update after the first skipped: X never moved
        raise FitError(f"a run's {n} points share one X; its slope needs a cross-run law")
    k_own = -np.sum((x - xbar) * (y - ybar)) / Sxx if own else 0.0
    r = y - ybar + k_own * (x - xbar)
    prior_k, prior_prec, s = 0.0, 0.0, None
    infl = ar1_inflation([r]) if own else 1.0
    if law is not None:
        j = int(np.argmin(np.abs(np.log(np.asarray(law.sizes) / N))))  # nearest fitted size
        # A run's slope differs from k(N) by the between-run spread and the error in k(N).
        prior_k = float(law.k(N))
        # Floored: one run a size with an exact line (e.g. 3 points) shows no spread at all.
        prior_prec = 1 / max(
            law.k_spread**2 + (float(np.var(law.k_draws(N))) if law.draws else law.k_var[j]),
            1e-12,
        )
        s, infl = law.resid_sd[j], law.ar_infl
    s_L = None if s is None else s * np.exp(ybar)
    if own and (n >= MIN_OWN_NOISE or s is None):
        s = np.sqrt(np.sum(r**2) / max(n - 2, 1))
        s_L = np.sqrt(np.sum((np.exp(y) - np.exp(y - r)) ** 2) / max(n - 2, 1))
    # Posterior of k: precisions add, the mean is the precision-weighted mean.
    own_prec = Sxx / (infl * s**2) if own else 0.0
    k_var = 1 / (own_prec + prior_prec)
    k = (k_own * own_prec + prior_k * prior_prec) * k_var
    return RunFit(
        k=float(k),
        k_var=float(k_var),
        E=float(ybar + k * xbar),  # the line through the run's centroid
        xbar=float(xbar),
        n=n,
        s=float(s),
        s_L=float(s_L),
        infl=float(infl),
        source="run" if law is None else ("run+prior" if own else "prior"),
    )


def _errors(pred: pd.DataFrame) -> dict:
    held = pred[pred["held_out"]]
    err = (held["pred"] - held["L"]).abs()
    covered = (held["lo"] <= held["L"]) & (held["L"] <= held["hi"])
    return {
        "n_held_out": int(len(held)),
        "mae": float(err.mean()),
        "max_error": float(err.max()),
        "coverage": float(covered.mean()),
    }


def intra_model(p: Points, fit_fraction: float = 0.25, level: float = 0.9) -> dict:
    """Fit each run's first fit_fraction of steps (law across runs as the prior), predict its rest."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    last_step = pd.Series(p.step).groupby(p.run_id).transform("max").to_numpy()
    early = p.step <= fit_fraction * last_step
    warnings = list(p.warnings)
    try:
        law = fit_main_law(p.subset(early))
        warnings += law.warnings
    except FitError as e:
        law = None
        warnings.append(f"no cross-run law on the early points ({e}); runs fitted alone")
    frames, runs = [], []
    for run in np.unique(p.run_id):
        i = np.flatnonzero(p.run_id == run)
        i = i[np.argsort(p.step[i])]
        fit_i, held_i = i[early[i]], i[~early[i]]
        try:
            rf = fit_run(p.X[fit_i], p.L[fit_i], law, p.N[i[0]])
        except FitError as e:
            warnings.append(f"run {run}: {e}")
            continue
        pred, lo, hi = rf.predict(p.X[i], level)
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run,
                    "N": p.N[i],
                    "X": p.X[i],
                    "L": p.L[i],
                    "pred": pred,
                    "lo": lo,
                    "hi": hi,
                    "held_out": ~early[i],
                }
            )
        )
        runs.append(
            {
                "run_id": str(run),
                "N": float(p.N[i[0]]),
                "n_fit": len(fit_i),
                "n_held_out": len(held_i),
                "k": rf.k,
                "k_source": rf.source,
                "final_pred": float(pred[-1]),
                "final_obs": float(p.L[i[-1]]),
                "final_error": float(abs(pred[-1] - p.L[i[-1]])),
            }
        )
    if not frames:
        raise FitError("intra-model: no run could be fitted on its early points")
    predictions = pd.concat(frames, ignore_index=True)
    final_err = np.array([r["final_error"] for r in runs])
    return {
        "protocol": "intra",
        "fit_fraction": fit_fraction,
        "level": level,
        "law": None
        if law is None
        else {"k_max": law.k_max, "N0": law.N0, "r2": law.r2, "n_points": law.n_points},
        **_errors(predictions),
        "final_mae": float(final_err.mean()),
        "final_max_error": float(final_err.max()),
        "runs": runs,
        "warnings": warnings,
        "predictions": predictions,
    }


def few_runs(p: Points, law: MainFit) -> str | None:
    """Why the run bootstrap's intervals are weak, or None: a size with fewer than
    MIN_BOOT_RUNS runs has at most a handful of distinct resamples (2 runs: 3), so its
    run-to-run spread rests on one degree of freedom and the interval on the t widening."""
    n = pd.Series(p.run_id).groupby(p.N).nunique()
    short = n[n < MIN_BOOT_RUNS]
    if short.empty:
        return None
    ci = law.ci or {}
    if (n == 1).all():
        return (
            f"every size has one run: a whole-run bootstrap can only redraw the fit itself, so "
            f"there are no intervals; run {MIN_BOOT_RUNS} seeds a size for intervals to trust"
        )
    return (
        f"{len(short)} of {len(n)} sizes have fewer than {MIN_BOOT_RUNS} runs "
        f"({', '.join(f'{N:.3g}: {c}' for N, c in short.items())}), too few for a whole-run "
        f"bootstrap to measure their spread: the intervals rest on {ci.get('dof', float('nan')):.2g} "
        f"degrees of freedom, widened {ci.get('widen', float('nan')):.2g}x; run "
        f"{MIN_BOOT_RUNS} seeds a size for intervals to trust"
    )


def inter_model(
    p: Points,
    level: float = 0.9,
    anchor_points: int = 3,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """Fit all sizes but the largest; predict the largest size's k and, from its first
    anchor_points evaluations (its starting loss), its whole curve."""
    N_big = p.N.max()
    law = fit_main_law(p.subset(p.N < N_big), n_boot=n_boot, level=level, seed=seed)
    big = p.subset(p.N == N_big)
    k_pred, k_b = float(law.k(N_big)), law.k_draws(N_big)
    k_lo, k_hi = percentile_ci(k_b, level)
    # The largest size's own slope, runs pooled, with its run-to-run standard error.
    runs, _, S_run = run_sums(big)
    # What the observed pooled slope adds to k(N_big)'s error: the between-run spread and each
    # run's slope noise, as seen at the largest fitted size (k_var = (tau^2 + v) / runs there),
    # over the held-out size's runs. Draws below 0 are cut: the law's k is positive.
    n_last = len(np.unique(p.run_id[p.N == law.sizes[-1]]))
    obs_sd = np.sqrt(law.k_var[-1] * n_last / len(runs))
    rng = np.random.default_rng(seed)
    k_obs_b = np.maximum(k_b + obs_sd * rng.standard_normal(len(k_b)), 0.0)
    pi_lo, pi_hi = percentile_ci(k_obs_b, level)
    _, _, _, Sxx, Sxy, _ = centred(S_run.sum(axis=0))
    _, _, _, Sxx_r, Sxy_r, _ = centred(S_run)
    k_runs = -Sxy_r / Sxx_r
    k_obs = float(-Sxy / Sxx)
    k_obs_se = float(np.std(k_runs, ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan")
    s = law.resid_sd[-1]  # noise of log L at the largest fitted size
    frames = []
    for run in runs:
        i = np.flatnonzero(big.run_id == run)
        i = i[np.argsort(big.step[i])]
        x, anchor = np.log(big.X[i]), i[:anchor_points]
        xa, ya = np.log(big.X[anchor]), np.log(big.L[anchor])
        # E_run = mean over anchors of (log L + k log X): the curve through its starting loss.
        mean = -k_pred * x + np.mean(ya + k_pred * xa)
        curves = -k_b[:, None] * x + np.mean(ya[None, :] + k_b[:, None] * xa, axis=1)[:, None]
        half = norm.ppf(0.5 + level / 2) * np.sqrt(
            curves.var(axis=0) + s**2 * (1 + 1 / len(anchor))
        )
        held = np.ones(len(i), dtype=bool)
        held[:anchor_points] = False
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run,
                    "N": N_big,
                    "X": big.X[i],
                    "L": big.L[i],
                    "pred": np.exp(mean),
                    "lo": np.exp(mean - half),
                    "hi": np.exp(mean + half),
                    "held_out": held,
                }
            )
        )
    predictions = pd.concat(frames, ignore_index=True)
    return {
        "protocol": "inter",
        "level": level,
        "N_held_out": float(N_big),
        "anchor_points": anchor_points,
        "law": {
            "k_max": law.k_max,
            "N0": law.N0,
            "r2": law.r2,
            "n_points": law.n_points,
            "ci": law.ci,
        },
        "k_pred": k_pred,
        "k_ci": [float(k_lo), float(k_hi)],  # k(N_big) of the law
        "k_pi": [float(pi_lo), float(pi_hi)],  # the observed pooled slope of N_big's runs
        "k_obs": k_obs,
        "k_obs_se": k_obs_se,
        "k_covered": bool(pi_lo <= k_obs <= pi_hi),
        "few_runs": few_runs(p, law),
        **_errors(predictions),
        "warnings": law.warnings,
        "predictions": predictions,
    }
