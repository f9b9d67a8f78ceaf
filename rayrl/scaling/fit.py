"""Fitting the main law: log L = -k(N) log X + E(N), k(N) = k_max / (1 + N0 / N).

Given (k_max, N0) the law is linear in E(N), so E is solved in closed form and only two
dimensions are searched: a global grid over (log k_max, log N0), then bounded least
squares from the best distinct grid cells. The closed form needs only per-run sums, so a
fit costs O(model sizes) whatever the number of points, and a bootstrap that resamples
whole runs refits in milliseconds per draw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from rayrl.scaling.bootstrap import (
    jackknife_groups,
    percentile_ci,
    run_counts,
    satterthwaite_dof,
    singleton_sizes,
    small_sample_factor,
)
from rayrl.scaling.laws import E_basis, k_of_N
from rayrl.scaling.table import Points

MIN_RUN_POINTS = 3  # a slope plus one degree of freedom
MIN_SIZES = 3  # k(N) has two parameters; a third size is the first check on them
GRID = 61
N_STARTS = 3
AT_BOUND = 0.01  # decades: a parameter this close to its search bound sits on it


class FitError(ValueError):
    """Data that cannot determine the law; the message says what is missing."""


def run_sums(p: Points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run: ids, N, and weighted sums [n, x, y, xx, xy, yy] of x = log X, y = log L."""
    runs, r = np.unique(p.run_id, return_inverse=True)
    x, y, w = p.x, p.y, p.w
    cols = (np.ones_like(x), x, y, x * x, x * y, y * y)
    S = np.stack([np.bincount(r, w * v, len(runs)) for v in cols], axis=1)
    N_run = np.zeros(len(runs))
    N_run[r] = p.N
    return runs, N_run, S


def centred(S: np.ndarray) -> tuple[np.ndarray, ...]:
    """n, xbar, ybar and the centred sums Sxx, Sxy, Syy from raw sums (last axis)."""
    n, Sx, Sy, Sxx, Sxy, Syy = np.moveaxis(S, -1, 0)
    xbar, ybar = Sx / n, Sy / n
    return n, xbar, ybar, Sxx - n * xbar**2, Sxy - n * xbar * ybar, Syy - n * ybar**2


@dataclass
class Solution:
    k_max: float
    N0: float
    E_params: np.ndarray  # E(N) per size (free form) or the smooth form's coefficients
    cost: float  # weighted sum of squared residuals on log L (Huber: its objective)
    lo: np.ndarray  # bounds on (log10 k_max, log10 N0)
    hi: np.ndarray


def E_offset(N, x_name: str, log_T: float):
    """o(N) in the smooth form E(N) = Phi(N) e + k(N) o(N).

    The smooth form is on the data axis; on the compute axis C = 6 N T D shifts the
    intercept by k(N) log(6 N T) (paper appendix C.2), T the mean tokens per sample.
    """
    N = np.asarray(N, dtype=float)
    return np.log(6 * N) + log_T if x_name == "compute" else np.zeros_like(N)


def solve(N: np.ndarray, S: np.ndarray, E_form: str = "free", offset=None) -> Solution:
    """Least squares for (k_max, N0, E) from per-size sums S (m, 6); N sorted and distinct.

    offset: o(N) of the smooth form at each size (zeros when None).
    """
    o = np.zeros_like(N) if offset is None else offset
    n, xbar, ybar, Sxx, Sxy, Syy = centred(S)
    k_hat = -Sxy / Sxx  # each size's own slope
    rss = Syy - Sxy**2 / Sxx  # each size's residual at its own slope
    top = k_hat.max()
    if not top > 1e-6:  # below this L moves by parts per million over the whole run
        raise FitError(f"no model size improves with X (largest slope {top:.3g}); k(N) needs k > 0")
    # With E(N) free, min over E_j of sum_i w (y + k x - E_j)^2 = Sxx_j (k - k_hat_j)^2 + rss_j:
    # the law is a weighted fit of k(N) to the per-size slopes.
    sqrt_Sxx = np.sqrt(Sxx)
    A = np.sqrt(n)[:, None] * E_basis(N)
    Q = np.linalg.qr(A)[0]

    def residuals(k):
        r = sqrt_Sxx * (k - k_hat)
        if E_form == "smooth":
            # E(N) = Phi(N) e + k(N) o(N): what the per-size intercepts miss of the smooth form.
            a = np.sqrt(n) * (ybar + k * (xbar - o))
            r = np.concatenate([r, a - (a @ Q) @ Q.T], axis=-1)
        return r

    # k_max >= k(N) for every N; N0 two decades either side of the sizes seen.
    lo = np.array([np.log10(top) - 0.5, np.log10(N.min()) - 2])
    hi = np.array([np.log10(top) + 2.5, np.log10(N.max()) + 2])
    g_k, g_N0 = (np.linspace(lo[i], hi[i], GRID) for i in (0, 1))
    k_grid = k_of_N(N, 10 ** g_k[:, None, None], 10 ** g_N0[None, :, None])
    grid_cost = (residuals(k_grid) ** 2).sum(-1)
    # Refine from the best cells that are not neighbours of a better one.
    starts: list[tuple[int, int]] = []
    for cell in np.argsort(grid_cost, axis=None):
        i, j = np.unravel_index(cell, grid_cost.shape)
        if all(max(abs(i - a), abs(j - b)) > 5 for a, b in starts):
            starts.append((i, j))
        if len(starts) == N_STARTS:
            break
    best = min(
        (
            least_squares(
                lambda t: residuals(k_of_N(N, 10 ** t[0], 10 ** t[1])),
                [g_k[i], g_N0[j]],
                bounds=(lo, hi),
            )
            for i, j in starts
        ),
        key=lambda s: s.cost,
    )
    k_max, N0 = 10 ** best.x[0], 10 ** best.x[1]
    k = k_of_N(N, k_max, N0)
    if E_form == "smooth":
        E_params = np.linalg.lstsq(A, np.sqrt(n) * (ybar + k * (xbar - o)), rcond=None)[0]
    else:
        E_params = ybar + k * xbar  # E_j = mean of (log L + k log X) over size j
    return Solution(k_max, N0, E_params, 2 * best.cost + rss.sum(), lo, hi)


def refine_huber(
    p: Points, sizes: np.ndarray, start: Solution, E_form: str, offset: np.ndarray
) -> Solution:
    """Robust refit on every point (Huber loss), from the least-squares solution."""
    j = np.searchsorted(sizes, p.N)
    x, y, sqrt_w = p.x, p.y, np.sqrt(p.w)
    Phi = E_basis(sizes)

    def residuals(q):
        k = k_of_N(sizes, 10 ** q[0], 10 ** q[1])
        E = q[2:] if E_form == "free" else Phi @ q[2:] + k * offset
        return sqrt_w * (y + k[j] * x - E[j])

    q0 = np.r_[np.log10(start.k_max), np.log10(start.N0), start.E_params]
    # Huber's threshold 1.345 sigma, sigma from the median absolute least-squares residual.
    f_scale = 1.345 * 1.4826 * np.median(np.abs(residuals(q0)))
    n_E = len(start.E_params)
    lo, hi = np.r_[start.lo, [-np.inf] * n_E], np.r_[start.hi, [np.inf] * n_E]
    sol = least_squares(
        residuals, np.clip(q0, lo, hi), loss="huber", f_scale=f_scale, bounds=(lo, hi)
    )
    return Solution(10 ** sol.x[0], 10 ** sol.x[1], sol.x[2:], 2 * sol.cost, start.lo, start.hi)


def ar1_inflation(runs_r: list[np.ndarray]) -> float:
    """(1 + rho) / (1 - rho), rho the lag-one autocorrelation pooled over runs' residuals
    (each in step order): AR(1) residuals carry only n (1 - rho) / (1 + rho) points' worth
    of information about a slope. Pooled because one short run's rho is mostly noise."""
    lag = sum(np.sum(r[1:] * r[:-1]) for r in runs_r)
    rho = np.clip(lag / max(sum(np.sum(r**2) for r in runs_r), 1e-300), 0.0, 0.9)
    return float((1 + rho) / (1 - rho))


def usable(p: Points) -> tuple[Points, list[str]]:
    """Drop runs too short for a slope; the warnings say which."""
    per_run = pd.DataFrame({"run": p.run_id, "X": p.X}).groupby("run")["X"].agg(["size", "nunique"])
    short = per_run.index[(per_run["size"] < MIN_RUN_POINTS) | (per_run["nunique"] < 2)]
    warnings = list(p.warnings)
    if len(short):
        warnings.append(
            f"dropped {len(short)} run(s) with fewer than {MIN_RUN_POINTS} points: {list(short)[:5]}"
        )
        p = p.subset(~np.isin(p.run_id, short))
    if len(p) == 0:
        raise FitError(f"no run has {MIN_RUN_POINTS} or more points with distinct X")
    return p, warnings


@dataclass
class MainFit:
    """A fitted main law, how well it fits, what it was fitted on, and its bootstrap."""

    x_name: str
    E_form: str
    loss: str
    k_max: float
    N0: float
    sizes: list[float]
    E_params: list[float]
    k_hat: list[float]  # each size's own slope, runs pooled
    k_hat_se: list[float]  # its run-to-run standard error (NaN for a single run)
    x_range: list[list[float]]  # observed [X_min, X_max] per size
    resid_sd: list[float]  # residual SD of log L per size
    k_spread: float  # between-run SD of slopes around k(N), net of each run's own noise
    k_var: list[float]  # variance of k at each size from its runs (used when no bootstrap)
    ar_infl: float  # slope-variance inflation for autocorrelated residuals, pooled over runs
    cost: float
    rmse: float
    r2: float  # on log L, the fitted quantity
    r2_L: float  # on L
    n_points: int
    n_runs: int
    n_models: int
    labels: list[str]
    log_T: float = float("nan")  # mean log tokens per sample (compute axis), for E_offset
    warnings: list[str] = field(default_factory=list)
    E_hat: list[float] = field(default_factory=list)  # each size's own intercept, with k_hat
    r2_size: list[float] = field(default_factory=list)  # R² of each size's own log-log line
    level: float = 0.9
    N0_bounds: list[float] = field(default_factory=list)  # N0's search range [lo, hi]
    draws: list[list[float]] | None = None  # bootstrap rows [k_max, N0, *E_params]
    ci: dict | None = None

    def k(self, N):
        return k_of_N(np.asarray(N, dtype=float), self.k_max, self.N0)

    def E(self, N, draw=None):
        """E(N) for the fit or one bootstrap draw [k_max, N0, *E_params]: a fitted size's value
        (free form) or the smooth form at any N."""
        draw = np.r_[self.k_max, self.N0, self.E_params] if draw is None else np.asarray(draw)
        E_params = draw[2:]
        N = np.asarray(N, dtype=float)
        if self.E_form == "smooth":
            # E(N) = Phi(N) e + k(N) o(N)
            Phi_e = (E_basis(N.ravel()) @ E_params).reshape(N.shape)
            return Phi_e + k_of_N(N, draw[0], draw[1]) * E_offset(N, self.x_name, self.log_T)
        sizes = np.asarray(self.sizes)
        j = np.clip(np.searchsorted(sizes, N), 0, len(sizes) - 1)
        if not np.allclose(sizes[j], N, rtol=1e-6):
            raise FitError(
                f"E(N) is free per size and N={N} was not fitted (sizes {self.sizes}); refit with E_form='smooth'"
            )
        return E_params[j]

    def log_loss(self, N, X):
        # log L = -k(N) log X + E(N)
        return -self.k(N) * np.log(X) + self.E(N)

    def predict(self, N, X) -> dict:
        """Predicted L at (N, X) and, with a bootstrap, its interval at self.level."""
        out = {"N": float(N), "X": float(X), "test_loss": float(np.exp(self.log_loss(N, X)))}
        if self.draws:
            d = np.asarray(self.draws)
            logL = [-k_of_N(N, b[0], b[1]) * np.log(X) + self.E(N, b) for b in d]
            out["lo"], out["hi"] = (
                float(v) for v in np.exp(percentile_ci(np.asarray(logL), self.level))
            )
        return out

    def k_draws(self, N) -> np.ndarray:
        d = np.asarray(self.draws)
        return k_of_N(np.asarray(N, dtype=float)[..., None], d[:, 0], d[:, 1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MainFit:
        return cls(**d)


def saturation(law: dict) -> tuple[bool, str]:
    """Is k(N)'s saturation identified? Yes when N0 lies inside the fitted sizes' span and
    its interval stays clear of the search bounds; the sentence says which test failed."""
    N0, sizes = law["N0"], law["sizes"]
    ci = law.get("ci") or {}
    lo, hi = ci.get("N0") or (float("nan"), float("nan"))
    if ci and not (ci.get("dof") or 0) > 0:  # no size has 2 runs: the draws are the fit itself
        lo = hi = float("nan")
    b_lo, b_hi = law["N0_bounds"]
    span = f"the sizes' span {min(sizes):.3g} to {max(sizes):.3g}"
    at_lo = np.isfinite(lo) and np.log10(lo) - np.log10(b_lo) < AT_BOUND
    at_hi = np.isfinite(hi) and np.log10(b_hi) - np.log10(hi) < AT_BOUND
    if N0 > max(sizes):
        # k(N0) = k_max / 2: where the fitted k(N) would turn over, past the largest size.
        where = f"{law['level']:.0%} CI {lo:.3g} to {hi:.3g}" if np.isfinite(lo) else "no interval"
        bound = (
            f"; N0 sits at its search bound {b_hi:.3g}, so only N0 > {max(sizes):.3g} is known"
            if np.log10(b_hi) - np.log10(N0) < AT_BOUND
            else f"; its interval reaches the search bound {b_hi:.3g}: no upper limit"
            if at_hi
            else ""
        )
        return False, (
            f"not identified: the fitted k(N) would reach half of k_max ({law['k_max']:.3g}) at "
            f"N = N0 = {N0:.3g} ({where}), {N0 / max(sizes):.3g}x the largest size; the ladder "
            f"({span}) stops below the knee{bound}"
        )
    if N0 < min(sizes):
        return False, (
            f"not identified: N0 = {N0:.3g} lies below {span}: every size is past the knee "
            "(k(N) near k_max throughout), so N0 is extrapolated"
        )
    if not np.isfinite(lo):
        return False, f"not identified: N0 = {N0:.3g} is inside {span}, but has no interval"
    if at_lo or at_hi:
        return False, (
            f"not identified: N0 = {N0:.3g} is inside {span}, but its {law['level']:.0%} interval "
            f"{lo:.3g} to {hi:.3g} reaches a search bound ({b_lo:.3g}, {b_hi:.3g})"
        )
    return True, (
        f"identified: N0 = {N0:.3g} ({law['level']:.0%} CI {lo:.3g} to {hi:.3g}) lies inside {span}, "
        f"clear of the search bounds ({b_lo:.3g}, {b_hi:.3g})"
    )


def _solve_counts(
    p, run_of_point, sizes, size_of_run, S_run, counts, E_form, loss, offset
) -> Solution:
    """One fit with runs weighted by their bootstrap multiplicities (all ones for the fit itself)."""
    S = np.zeros((len(sizes), S_run.shape[1]))
    np.add.at(S, size_of_run, counts[:, None] * S_run)
    sol = solve(sizes, S, E_form, offset)
    if loss == "huber":
        # Huber is not a sum of squares, so resampled runs are repeated point by point.
        sol = refine_huber(
            p.subset(np.repeat(np.arange(len(p)), counts[run_of_point].astype(int))),
            sizes,
            sol,
            E_form,
            offset,
        )
    return sol


def _bootstrap(
    refit, sol: Solution, size_of_run, n_boot, level, seed, warnings
) -> tuple[np.ndarray, dict]:
    """Whole-run draws [k_max, N0, *E_params], widened for few runs per size, and intervals."""
    counts = run_counts(size_of_run, n_boot, np.random.default_rng(seed))
    draws = np.full((n_boot, 2 + len(sol.E_params)), np.nan)
    for b, c in enumerate(counts):
        try:
            s = refit(c)
        except FitError:
            continue  # counted below; such a draw has no law to report
        draws[b] = np.r_[s.k_max, s.N0, s.E_params]
    failed = int(np.isnan(draws[:, 0]).sum())
    if failed:
        warnings.append(f"bootstrap: {failed} of {n_boot} draws could not be fitted")
    singles = singleton_sizes(size_of_run)
    if len(singles):
        warnings.append(
            f"bootstrap: sizes {singles.tolist()} have one run each; "
            "their run-to-run spread is unseen, so intervals are too narrow"
        )
    # Jackknife over runs that share their size: how many degrees of freedom the run-to-run
    # spread rests on.
    groups, size_of_group = jackknife_groups(size_of_run)
    jack = np.full((len(groups), 2), np.nan)
    for g, left_out in enumerate(groups):
        keep = np.ones(len(size_of_run))
        keep[left_out] = 0.0
        s = refit(keep)
        jack[g] = np.log10([s.k_max, s.N0])
    nu = satterthwaite_dof(jack, size_of_group)
    widen = small_sample_factor(size_of_run, nu, level)
    draws = draws[~np.isnan(draws[:, 0])]
    # k_max and N0 are widened on the log scale: both are positive, so k(N) > 0 in every draw
    # (widened linearly, k_max went negative with 2 runs a size, where widen is ~3).
    draws[:, :2] = np.log(draws[:, :2])
    center = np.r_[np.log(sol.k_max), np.log(sol.N0), sol.E_params]
    draws = center + widen * (draws - center)
    draws[:, :2] = np.exp(draws[:, :2])
    # The parameters' intervals stop at the search box (the fit never returns a value outside
    # it); the draws are not clipped, which would break k_max and N0's correlation in k(N).
    ci = np.clip(percentile_ci(draws[:, :2], level), 10**sol.lo, 10**sol.hi)
    return draws, {
        "level": level,
        "n_boot": n_boot,
        "dof": nu,
        "widen": widen,
        "k_max": ci[:, 0].tolist(),
        "N0": ci[:, 1].tolist(),
    }


def _at_bounds(sol: Solution) -> list[str]:
    """A warning for each parameter that sits on its search bound."""
    out = []
    for name, i, side in (("k_max", 0, "upper"), ("N0", 1, "upper"), ("N0", 1, "lower")):
        edge = sol.hi[i] if side == "upper" else sol.lo[i]
        if abs(np.log10([sol.k_max, sol.N0][i]) - edge) < AT_BOUND:
            out.append(f"{name} at its {side} search bound: the sizes do not pin k(N)'s saturation")
    return out


def _run_spread(
    p: Points,
    run_of_point: np.ndarray,
    S_run: np.ndarray,
    N_run: np.ndarray,
    size_of_run: np.ndarray,
    sol: Solution,
) -> tuple[float, float, np.ndarray, list[float]]:
    """How the runs' own slopes scatter: the AR(1) inflation of their residual variance, the
    between-run spread tau^2 of k around k(N), each run's slope variance, and each size's
    SE of k_hat from its runs (NaN for a size of one run)."""
    _, xbar_r, ybar_r, Sxx_r, Sxy_r, Syy_r = centred(S_run)
    k_run = -Sxy_r / Sxx_r
    # Each run's slope variance from its own residuals; what the run slopes scatter around
    # k(N) beyond that is the between-run spread tau (method of moments).
    v_run = (Syy_r - Sxy_r**2 / Sxx_r) / np.maximum(np.bincount(run_of_point) - 2, 1) / Sxx_r
    r_run = p.y - ybar_r[run_of_point] + k_run[run_of_point] * (p.x - xbar_r[run_of_point])
    order = np.lexsort((p.step, run_of_point))
    infl = ar1_inflation(np.split(r_run[order], np.flatnonzero(np.diff(run_of_point[order])) + 1))
    v_run *= infl
    tau2 = max(0.0, float(np.mean((k_run - k_of_N(N_run, sol.k_max, sol.N0)) ** 2 - v_run)))
    k_hat_se = [
        float(np.std(k_run[size_of_run == m], ddof=1) / np.sqrt((size_of_run == m).sum()))
        if (size_of_run == m).sum() > 1
        else float("nan")
        for m in range(int(size_of_run.max()) + 1)
    ]
    return infl, tau2, v_run, k_hat_se


def fit_main_law(
    p: Points,
    E_form: str = "free",
    loss: str = "linear",
    n_boot: int = 0,
    level: float = 0.9,
    seed: int = 0,
) -> MainFit:
    """Fit log L = -k(N) log X + E(N) on every run in p; n_boot > 0 adds whole-run bootstrap intervals."""
    if E_form not in ("free", "smooth") or loss not in ("linear", "huber"):
        raise ValueError(
            f"E_form must be 'free' or 'smooth' and loss 'linear' or 'huber'; got {E_form!r}, {loss!r}"
        )
    p, warnings = usable(p)
    runs, N_run, S_run = run_sums(p)
    run_of_point = np.searchsorted(runs, p.run_id)
    sizes, size_of_run = np.unique(N_run, return_inverse=True)
    need = MIN_SIZES + (E_form == "smooth")  # the smooth E(N) has three coefficients of its own
    if len(sizes) < need:
        raise FitError(
            f"{len(sizes)} model size(s) ({', '.join(f'{n:.3g}' for n in sizes)}) cannot determine "
            f"k(N) = k_max / (1 + N0 / N) with E(N) {E_form}: need at least {need}"
        )
    offset = E_offset(sizes, p.x_name, p.log_T)
    if E_form == "smooth" and np.isnan(offset).any():
        raise FitError(
            "smooth E(N) on the compute axis needs data_samples to measure tokens per sample (C = 6 N T D)"
        )
    sol = _solve_counts(
        p, run_of_point, sizes, size_of_run, S_run, np.ones(len(runs)), E_form, loss, offset
    )
    warnings += _at_bounds(sol)
    k_size = k_of_N(sizes, sol.k_max, sol.N0)
    E_size = E_basis(sizes) @ sol.E_params + k_size * offset if E_form == "smooth" else sol.E_params
    j = np.searchsorted(sizes, p.N)
    log_pred = -k_size[j] * p.x + E_size[j]
    r = p.y - log_pred
    S = np.zeros((len(sizes), 6))
    np.add.at(S, size_of_run, S_run)
    # Each size's own line log L = -k_hat log X + E_hat, runs pooled: the per-size trend the
    # law's k(N) has to explain.
    _, xbar, ybar, Sxx, Sxy, Syy = centred(S)
    k_hat = -Sxy / Sxx
    infl, tau2, v_run, k_hat_se = _run_spread(p, run_of_point, S_run, N_run, size_of_run, sol)
    fit = MainFit(
        x_name=p.x_name,
        E_form=E_form,
        loss=loss,
        k_max=float(sol.k_max),
        N0=float(sol.N0),
        sizes=sizes.tolist(),
        E_params=np.asarray(sol.E_params).tolist(),
        k_hat=k_hat.tolist(),
        k_hat_se=k_hat_se,
        x_range=[[float(p.X[j == m].min()), float(p.X[j == m].max())] for m in range(len(sizes))],
        resid_sd=[float(np.sqrt(np.mean(r[j == m] ** 2))) for m in range(len(sizes))],
        k_spread=float(np.sqrt(tau2)),
        ar_infl=infl,
        k_var=[
            float((tau2 + v_run[size_of_run == m].mean()) / (size_of_run == m).sum())
            for m in range(len(sizes))
        ],
        cost=float(sol.cost),
        rmse=float(np.sqrt(np.mean(r**2))),
        r2=float(1 - np.sum(r**2) / np.sum((p.y - p.y.mean()) ** 2)),
        r2_L=float(1 - np.sum((p.L - np.exp(log_pred)) ** 2) / np.sum((p.L - p.L.mean()) ** 2)),
        n_points=len(p),
        n_runs=len(runs),
        n_models=len(sizes),
        labels=[p.labels.get(n, f"{n / 1e9:.3g}B") for n in sizes],
        log_T=p.log_T,
        warnings=warnings,
        E_hat=(ybar + k_hat * xbar).tolist(),
        r2_size=np.divide(Sxy**2, Sxx * Syy, out=np.full_like(Syy, np.nan), where=Syy > 0).tolist(),
        level=level,
        N0_bounds=[float(10 ** sol.lo[1]), float(10 ** sol.hi[1])],
    )
    if n_boot > 0:

        def refit(counts):
            return _solve_counts(
                p, run_of_point, sizes, size_of_run, S_run, counts, E_form, loss, offset
            )

        draws, fit.ci = _bootstrap(refit, sol, size_of_run, n_boot, level, seed, warnings)
        fit.draws = draws.tolist()
        fit.ci["k"] = percentile_ci(fit.k_draws(sizes).T, level).T.tolist()
    return fit
