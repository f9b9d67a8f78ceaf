"""Which law form predicts best: each form is fitted on the first fraction of every run
and scored by its error on the held-out rest (the intra-model split).

Forms:
- main, E free:   log L = -k(N) log X + E_N, k(N) = k_max / (1 + N0 / N)        (eq. 1-2)
- main, E smooth: the same with E(N) a quadratic in log N (+ the C.2 shift)
- per-size power law: log L = -k_N log X + E_N, no k(N) structure
- decomposition:  L = E + A / N^alpha + B_N (1 - P(X)), P logistic in log X     (eq. 19)
- sigmoid:        R = 1 - L = R0 + (A - R0) / (1 + (C_mid / C)^B), per size
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.stats import norm

from rayrl.scaling.fit import FitError, centred, fit_main_law, run_sums
from rayrl.scaling.laws import decomposition_loss, sigmoid_reward
from rayrl.scaling.table import Points

D_HALF_STARTS = (0.0, 2.0, 5.0)  # log X_half beyond the last fitted point, for multi-start


def _best(fun, starts, lo, hi, jac="2-point"):
    # x_scale="jac" and an iterative trust-region solver: the 3 + 3 m parameters are badly scaled.
    return min(
        (
            least_squares(
                fun, np.clip(q, lo, hi), jac=jac, bounds=(lo, hi), x_scale="jac", tr_solver="lsmr"
            )
            for q in starts
        ),
        key=lambda s: s.cost,
    )


def fit_decomposition(p: Points):
    """Appendix D: global E, A, alpha; per size B_N, D_half_N, beta_N. Returns (predict, params)."""
    sizes, j = np.unique(p.N, return_inverse=True)
    m, x = len(sizes), p.x
    N_ref = np.exp(np.mean(np.log(sizes)))  # A / N^alpha = a (N / N_ref)^-alpha keeps a near O(1)
    x_top = np.array([x[j == i].max() for i in range(m)])
    L_top = np.array([p.L[j == i].max() for i in range(m)])

    def unpack(q):
        E, a, alpha = q[:3]
        B, log_D_half, beta = q[3:].reshape(3, m)
        return E, a * N_ref**alpha, alpha, B, np.exp(log_D_half), beta

    def residuals(q):
        E, A, alpha, B, D_half, beta = unpack(q)
        return decomposition_loss(p.N, p.X, E, A, alpha, B[j], D_half[j], beta[j]) - p.L

    one_hot = np.eye(m)[j]

    def jacobian(q):
        # L = E + a (N / N_ref)^-alpha + B (1 - P), P = expit(beta (log X - log D_half))
        a, alpha = q[1], q[2]
        B, log_D_half, beta = (v[j] for v in q[3:].reshape(3, m))
        P = 1 / (1 + np.exp(-beta * (x - log_D_half)))
        size_term = (p.N / N_ref) ** -alpha
        dP = P * (1 - P)
        cols = [np.ones_like(x), size_term, -a * size_term * np.log(p.N / N_ref)]
        per_size = [1 - P, B * beta * dP, -B * dP * (x - log_D_half)]
        return np.column_stack(cols + [c[:, None] * one_hot for c in per_size])

    lo = np.r_[0.0, 0.0, 0.0, np.zeros(m), x_top - 10, np.full(m, 0.01)]
    hi = np.r_[1.0, 1.0, 3.0, np.ones(m), x_top + 15, np.full(m, 10.0)]
    floor = 0.5 * p.L.min()
    starts = [
        np.r_[floor, 0.1, 0.3, L_top - floor, x_top + d, np.full(m, 0.5)] for d in D_HALF_STARTS
    ]
    q = _best(residuals, starts, lo, hi, jacobian).x

    E, A, alpha, B, D_half, beta = unpack(q)

    def predict(N, X):
        i = np.searchsorted(sizes, N)
        return decomposition_loss(N, X, E, A, alpha, B[i], D_half[i], beta[i])

    per_size = {"B": B, "D_half": D_half, "beta": beta}  # as the paper's table 7, plus B
    return predict, {"E": E, "A": A, "alpha": alpha, **{k: v.tolist() for k, v in per_size.items()}}


def fit_sigmoid(p: Points, level: float = 0.9):
    """R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) per size, on R = 1 - L (ScaleRL's curve).
    Returns (predict, params); params["ci"] holds each size's `level` intervals of A, B and
    C_mid from the fit's curvature (J'J)^-1 s^2, NaN where it has no residual freedom."""
    params, ses = {}, {}
    for N in np.unique(p.N):
        at = p.N == N
        x, R = p.x[at], 1 - p.L[at]

        def residuals(q, X=p.X[at], R=R):
            return sigmoid_reward(X, q[0], q[1], np.exp(q[2]), q[3]) - R

        lo, hi = np.r_[0.0, 0.0, x.max() - 10, 0.01], np.r_[1.0, 1.0, x.max() + 15, 10.0]
        starts = [np.r_[R.min(), min(1.0, R.max() + 0.2), x.max() + d, 0.5] for d in D_HALF_STARTS]
        fit = _best(residuals, starts, lo, hi)
        params[N], ses[N] = fit.x, _standard_errors(fit, len(R))

    def predict(N, X):
        q = np.array([params[n] for n in np.atleast_1d(N)])
        return 1 - sigmoid_reward(X, q[:, 0], q[:, 1], np.exp(q[:, 2]), q[:, 3])

    q, se = np.array(list(params.values())), np.array(list(ses.values()))
    z = norm.ppf(0.5 + level / 2)
    return predict, {
        "R0": q[:, 0].tolist(),
        "A": q[:, 1].tolist(),
        "C_mid": np.exp(q[:, 2]).tolist(),
        "B": q[:, 3].tolist(),
        "level": level,
        "ci": {  # C_mid's interval is symmetric in log C_mid, where it was fitted
            "A": np.c_[q[:, 1] - z * se[:, 1], q[:, 1] + z * se[:, 1]].tolist(),
            "B": np.c_[q[:, 3] - z * se[:, 3], q[:, 3] + z * se[:, 3]].tolist(),
            "C_mid": np.exp(
                np.clip(np.c_[q[:, 2] - z * se[:, 2], q[:, 2] + z * se[:, 2]], -700, 700)
            ).tolist(),
        },
    }


def _standard_errors(fit, n: int) -> np.ndarray:
    """Asymptotic SEs of a least-squares fit: sqrt(diag((J'J)^-1) * RSS / (n - p))."""
    J = fit.jac
    dof = n - J.shape[1]
    if dof <= 0:
        return np.full(J.shape[1], np.nan)
    cov = np.linalg.pinv(J.T @ J) * (2 * fit.cost / dof)
    return np.sqrt(np.clip(np.diag(cov), 0, None))


def fit_per_size(p: Points):
    """log L = -k_N log X + E_N with k_N free per size (runs pooled). Returns (predict, params)."""
    _, N_run, S_run = run_sums(p)
    sizes, j = np.unique(N_run, return_inverse=True)
    S = np.zeros((len(sizes), 6))
    np.add.at(S, j, S_run)
    n, xbar, ybar, Sxx, Sxy, _ = centred(S)
    if (Sxx <= 0).any():
        raise FitError(f"sizes {sizes[Sxx <= 0].tolist()} have one distinct X: no slope")
    k = -Sxy / Sxx

    def predict(N, X):
        i = np.searchsorted(sizes, N)
        return np.exp(ybar[i] - k[i] * (np.log(X) - xbar[i]))

    return predict, {"k": k.tolist(), "E": (ybar + k * xbar).tolist()}


def _main(E_form):
    def fit(p: Points):
        law = fit_main_law(p, E_form=E_form)
        return lambda N, X: np.exp(law.log_loss(N, X)), {
            "k_max": law.k_max,
            "N0": law.N0,
            "E": law.E_params,
        }

    return fit


FORMS = {
    "main (E free)": _main("free"),
    "main (E smooth)": _main("smooth"),
    "per-size power law": fit_per_size,
    "decomposition (app. D)": fit_decomposition,
    "sigmoid": fit_sigmoid,
}


def compare_forms(p: Points, fit_fraction: float = 0.25) -> dict:
    """Each law form's held-out MAE and max error (best first), with its fit on the training
    points: loss (SSE on L), R² on L, points, free parameters and their values. Forms that
    cannot be fitted say why."""
    last_step = pd.Series(p.step).groupby(p.run_id).transform("max").to_numpy()
    early = p.step <= fit_fraction * last_step
    train, held = p.subset(early), p.subset(~early)
    rows = []
    for name, fit in FORMS.items():
        try:
            predict, params = fit(train)
            n_free = int(sum(np.size(v) for v in params.values()))
            if n_free >= len(train):
                # an interpolating fit's held-out error says nothing about the form
                raise FitError(f"{n_free} free parameters for {len(train)} training points")
            err = np.abs(predict(held.N, held.X) - held.L)
            r = predict(train.N, train.X) - train.L
            rows.append(
                {
                    "form": name,
                    "mae": float(err.mean()),
                    "max_error": float(err.max()),
                    "train_loss": float(np.sum(r**2)),
                    "train_r2": float(1 - np.sum(r**2) / np.sum((train.L - train.L.mean()) ** 2)),
                    "n_points": len(train),
                    "n_free": n_free,
                    "params": params,
                }
            )
        except (FitError, ValueError, np.linalg.LinAlgError) as e:
            rows.append({"form": name, "error": str(e)})
    rows.sort(key=lambda r: r.get("mae", np.inf))
    return {"split": "intra", "fit_fraction": fit_fraction, "n_held_out": len(held), "forms": rows}
