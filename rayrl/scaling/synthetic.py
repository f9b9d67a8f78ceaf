"""Metric tables drawn from known laws in the paper's regime, for tests and benchmarks.

Each run follows log L = -k_run log C + E_run with k_run = k(N) (1 + k_jitter z): seeds of
one size start from the same base-model loss and fan out. The base-model losses are the
paper's table 5 final losses (Qwen2.5 base) walked back along its own fit (k_max 0.135,
N0 13.1B), so the paper's law reproduces table 5 and other laws stay below L = 1.
Evaluation noise is binomial-shaped, SE = 2 sigma sqrt(L (1 - L)) (sigma at L = 0.5), with
lag-one autocorrelation rho, so points of a run are correlated, as in real runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rayrl.scaling.laws import k_of_N

PAPER_SIZES = (0.5e9, 1.5e9, 3e9, 7e9, 14e9, 32e9, 72e9)
PAPER_FINAL_LOSS = (0.9419, 0.9129, 0.8582, 0.7148, 0.6051, 0.4937, 0.4359)  # table 5, base
TOKENS_PER_SAMPLE = 1000
SAMPLES_PER_STEP = 512  # 64 prompts x 8 rollouts


def start_loss(N: float, points: int) -> float:
    """Base-model loss: table 5's final loss (interpolated in log N) before `points` x compute."""
    final = np.interp(np.log(N), np.log(PAPER_SIZES), PAPER_FINAL_LOSS)
    # L_start = L_final (C_end / C_start)^k, with C_end / C_start = points
    return float(final * points ** k_of_N(N, 0.135, 13.1e9))


def make_metrics(
    k_max: float = 0.135,
    N0: float = 13.1e9,
    sizes: tuple[float, ...] = PAPER_SIZES,
    seeds: int = 3,
    points: int = 100,
    eval_every: int = 10,
    sigma: float = 0.01,
    rho: float = 0.5,
    k_jitter: float = 0.03,
    reuse_factor: int = 1,
    overfit: float = 0.0,
    seed: int = 0,
    family: str = "synthetic",
) -> pd.DataFrame:
    """A metrics table (rayrl/DESIGN.md columns) whose runs follow the main law with these k_max and N0.

    overfit adds overfit * D / D_total to log L: a run that loses ground as it repeats data.
    """
    rng = np.random.default_rng(seed)
    steps = eval_every * np.arange(1, points + 1)
    rows = []
    for N in sizes:
        C = 6 * N * TOKENS_PER_SAMPLE * SAMPLES_PER_STEP * steps  # C = 6 N tokens (eq. 10-11)
        k = k_of_N(N, k_max, N0)
        E = np.log(start_loss(N, points)) + k * np.log(C[0])
        for s in range(seeds):
            k_run = k * (1 + k_jitter * rng.standard_normal())
            E_run = E + (k_run - k) * np.log(C[0])  # same start for every seed
            log_L = -k_run * np.log(C) + E_run + overfit * steps / steps[-1]
            # AR(1) noise of unit variance, scaled to the binomial-shaped SE.
            z = np.empty(points)
            z[0] = rng.standard_normal()
            for t in range(1, points):
                z[t] = rho * z[t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal()
            se = 2 * sigma * np.sqrt(np.exp(log_L) * (1 - np.exp(log_L)))
            L = np.clip(np.exp(log_L) + se * z, 1e-3, 1.0)  # a pass rate stays in [0, 1]
            D = SAMPLES_PER_STEP * steps
            rows.append(
                pd.DataFrame(
                    {
                        "run_id": f"{family}-{N / 1e9:g}b-tau{reuse_factor}-s{s}",
                        "family": family,
                        "model": f"{N / 1e9:g}B",
                        "n_params": N,
                        "step": steps,
                        "compute_flops": C,
                        "data_samples": D,
                        "unique_samples": np.minimum(D, D[-1] // reuse_factor),
                        "rollout_n": 8,
                        "reuse_factor": reuse_factor,
                        "seed": s,
                        "test_loss": L,
                        "test_loss_se": se,
                        "true_loss": np.exp(log_L),  # noise-free, for scoring predictions
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def make_reuse_metrics(
    taus: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100),
    tau_safe: int = 25,
    overfit: float = 0.05,
    N: float = 7e9,
    seed: int = 0,
    **kwargs,
) -> pd.DataFrame:
    """A data-reuse study at fixed D_total: runs with tau <= tau_safe learn alike, beyond it they overfit.

    The overfitting penalty on the final log L is overfit * log(tau / tau_safe) for tau > tau_safe.
    """
    tables = [
        make_metrics(
            sizes=(N,),
            reuse_factor=tau,
            overfit=overfit * max(0.0, np.log(tau / tau_safe)),
            seed=seed + i,
            **kwargs,
        )
        for i, tau in enumerate(taus)
    ]
    return pd.concat(tables, ignore_index=True)
