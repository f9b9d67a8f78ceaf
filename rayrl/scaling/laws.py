"""The scaling laws as plain functions (Tan et al., eq. 1-2 and 16-19, plus a sigmoid).

Symbols follow the paper: N non-embedding parameters, X the resource (compute C in
FLOPs or data D in samples), L test loss = 1 - pass@1.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

E_SMOOTH_DEGREE = 2  # E(N) smooth form: a quadratic in log N


def k_of_N(N, k_max, N0):
    # k(N) = k_max / (1 + N0 / N)                       (eq. 2)
    return k_max / (1.0 + N0 / N)


def log_loss(N, X, k_max, N0, E):
    # log L = -k(N) * log X + E(N)                       (eq. 1, 6, 8)
    return -k_of_N(N, k_max, N0) * np.log(X) + E


def E_basis(N) -> np.ndarray:
    """Columns [1, log N, (log N)^2] of rayrl's smooth E(N) form (the paper leaves E(N) free)."""
    return np.vander(np.log(np.asarray(N, dtype=float)), E_SMOOTH_DEGREE + 1, increasing=True)


def decomposition_loss(N, D, E, A, alpha, B, D_half, beta):
    # P(D) = 1 / (1 + (D_half / D)^beta(N)): a logistic in log D   (eq. 18)
    P = expit(beta * (np.log(D) - np.log(D_half)))
    # L = E + A / N^alpha + B(N) * (1 - P(D))                      (eq. 16, 17, 19)
    return E + A / N**alpha + B * (1.0 - P)


def sigmoid_reward(C, R0, A, C_mid, B):
    # R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B), R = 1 - L      (sigmoidal compute curve)
    return R0 + (A - R0) * expit(B * (np.log(C) - np.log(C_mid)))
