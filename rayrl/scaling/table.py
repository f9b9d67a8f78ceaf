"""Metric rows (rayrl/DESIGN.md schema) to the arrays a fit uses, with bad rows named, not hidden."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from rayrl.metrics import MetricsError, x_column

FIT_COLUMNS = ("run_id", "n_params", "step", "test_loss")  # what a fit reads, besides X


@dataclass
class Points:
    """One fittable point per row: run, size N, step, resource X, loss L, weight w on log L."""

    run_id: np.ndarray
    N: np.ndarray
    step: np.ndarray
    X: np.ndarray
    L: np.ndarray
    w: np.ndarray
    x_name: str
    labels: dict[float, str] = field(default_factory=dict)  # N -> model name, for figures
    log_T: float = float("nan")  # mean log tokens per sample, log(C / (6 N D)), on the compute axis
    warnings: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def x(self) -> np.ndarray:
        return np.log(self.X)

    @property
    def y(self) -> np.ndarray:
        return np.log(self.L)

    def __len__(self) -> int:
        return len(self.L)

    def subset(self, mask: np.ndarray) -> Points:
        arrays = {k: getattr(self, k)[mask] for k in ("run_id", "N", "step", "X", "L", "w")}
        return replace(self, **arrays, warnings=list(self.warnings), excluded=dict(self.excluded))


def main_rollout_n(df: pd.DataFrame) -> int | None:
    """The group size most model sizes ran at tau = 1 (ties: more runs, then the smaller n):
    the size sweep's, when a table does not say."""
    base = df[pd.to_numeric(df["reuse_factor"], errors="coerce").fillna(1) == 1]
    if base.empty or "rollout_n" not in base.columns:
        return None
    by_n = base.groupby("rollout_n").agg(sizes=("n_params", "nunique"), runs=("run_id", "nunique"))
    best = by_n.reset_index().sort_values(
        ["sizes", "runs", "rollout_n"], ascending=[False, False, True]
    )
    return int(best["rollout_n"].iloc[0])


def law_rows(df: pd.DataFrame, rollout_n: int | None = None) -> tuple[pd.DataFrame, dict]:
    """The one rule for the rows of a main law, which the live fitter, `rayrl fit`, the
    report, the planner and the scheduler all go through: tau = 1 at the main group size
    (the study's grpo.rollout_n; by default main_rollout_n), so k(N) compares like with like.
    Runs at other n feed the rollout-n study, reuse runs the eq. 9 study.

    Returns the rows and what the rule kept and left out, for the fit document."""
    rule: dict = {"reuse_factor": 1, "excluded": {}}
    if "reuse_factor" in df.columns:
        reuse = pd.to_numeric(df["reuse_factor"], errors="coerce").fillna(1)
        if (reuse != 1).any():
            rule["excluded"]["reuse_factor != 1"] = int((reuse != 1).sum())
        df = df[reuse == 1]
    if "rollout_n" in df.columns:
        n = main_rollout_n(df) if rollout_n is None else rollout_n
        rule["rollout_n"] = n
        off = df["rollout_n"] != n
        if off.any():
            rule["excluded"][f"rollout_n != {n}"] = int(off.sum())
        df = df[~off]
    rule["runs"] = sorted(map(str, df["run_id"].unique())) if "run_id" in df.columns else []
    return df, rule


def to_points(
    df: pd.DataFrame,
    x: str = "compute",
    family: str | None = None,
    source: str = "metrics",
) -> Points:
    """Validate rows and keep those a log-log fit can use; every dropped row is counted and named."""
    try:
        x_col = x_column(x)
    except MetricsError as e:
        raise MetricsError(f"{source}: {e}") from None
    missing = [c for c in (*FIT_COLUMNS, x_col) if c not in df.columns]
    if missing:
        raise MetricsError(f"{source}: missing column(s) {missing}; have {list(df.columns)}")
    warnings: list[str] = []
    excluded: dict[str, int] = {}

    if "family" in df.columns and df["family"].nunique() > 1:
        families = sorted(map(str, df["family"].unique()))
        if family is None:
            raise MetricsError(f"{source}: rows hold families {families}; pick one with family=")
    if family is not None:
        if "family" not in df.columns or family not in set(df["family"].astype(str)):
            raise MetricsError(f"{source}: no rows with family == {family!r}")
        df = df[df["family"].astype(str) == family]

    L = pd.to_numeric(df["test_loss"], errors="coerce").to_numpy(float)
    X = pd.to_numeric(df[x_col], errors="coerce").to_numpy(float)
    N = pd.to_numeric(df["n_params"], errors="coerce").to_numpy(float)
    step = pd.to_numeric(df["step"], errors="coerce").to_numpy(float)
    checks = {
        "test_loss is NaN": np.isnan(L),
        "test_loss outside (0, 1]": ~np.isnan(L) & ((L <= 0) | (L > 1)),
        f"{x_col} is NaN, infinite or negative": ~np.isfinite(X) | (X < 0),
        "n_params is NaN, infinite or not positive": ~(np.isfinite(N) & (N > 0)),
        "step is NaN": np.isnan(step),
    }
    bad = np.zeros(len(df), dtype=bool)
    for reason, mask in checks.items():
        mask = mask & ~bad
        if mask.any():
            excluded[reason] = int(mask.sum())
            warnings.append(f"{source}: dropped {int(mask.sum())} row(s): {reason}")
        bad |= mask
    # X = 0 is a baseline evaluation before training: log X is undefined, so it is not a point.
    zero = ~bad & (X == 0)
    if zero.any():
        excluded[f"{x_col} == 0 (baseline)"] = int(zero.sum())
    keep = ~bad & ~zero
    if not keep.any():
        raise MetricsError(f"{source}: no usable rows ({excluded})")

    w = np.ones(int(keep.sum()))
    if "test_loss_se" in df.columns:
        se = pd.to_numeric(df["test_loss_se"], errors="coerce").to_numpy(float)[keep]
        if np.all(se > 0):
            # Var(log L) ~ (se / L)^2: inverse-variance weights on log L.
            w = (L[keep] / se) ** 2
            w = w / w.mean()
        else:
            warnings.append(
                f"{source}: test_loss_se missing or not positive on some rows; fit unweighted"
            )
    run_id = df["run_id"].astype(str).to_numpy()[keep]
    labels = {}
    if "model" in df.columns:
        labels = dict(zip(N[keep], df["model"].astype(str).to_numpy()[keep]))
    per_run = pd.Series(N[keep]).groupby(run_id).nunique()
    if (per_run > 1).any():
        raise MetricsError(
            f"{source}: runs with more than one n_params: {list(per_run[per_run > 1].index)}"
        )
    log_T = float("nan")
    if x == "compute" and "data_samples" in df.columns:
        D = pd.to_numeric(df["data_samples"], errors="coerce").to_numpy(float)[keep]
        ok = D > 0
        if ok.any():
            log_T = float(np.mean(np.log(X[keep][ok] / (6 * N[keep][ok] * D[ok]))))  # C = 6 N T D
    return Points(
        run_id, N[keep], step[keep], X[keep], L[keep], w, x, labels, log_T, warnings, excluded
    )
