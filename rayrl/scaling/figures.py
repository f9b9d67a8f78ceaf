"""Figures in the paper's style: loss against C or D per size on log-log axes with the fitted
law and its extrapolation (fig. 2-4), each size on its own panel, and k(N) against N with the
saturation curve (fig. 5).

Figure objects are used directly (Agg canvas, no pyplot state), so this is safe in actors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

from rayrl.scaling.bootstrap import percentile_ci
from rayrl.scaling.fit import MainFit
from rayrl.scaling.table import Points

AXIS_LABEL = {"compute": "training compute C (FLOPs)", "data": "training data D (samples)"}
EXTRAPOLATE = 10.0  # draw each size's law to 10x its last X


def plot_loss_curves(
    p: Points, fit: MainFit, path: str | Path, protocol: dict | None = None
) -> Path:
    """Mean L per size and step, the fitted law over the observed X (solid) and beyond (dashed);
    with a protocol result, its predictions and intervals on the held-out points."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    colors = {N: f"C{i}" for i, N in enumerate(np.unique(p.N))}
    mean = (
        pd.DataFrame({"N": p.N, "step": p.step, "X": p.X, "L": p.L}).groupby(["N", "step"]).mean()
    )
    for N, g in mean.groupby(level="N"):
        ax.scatter(
            g["X"],
            g["L"],
            s=6,
            alpha=0.5,
            color=colors[N],
            label=p.labels.get(N, f"{N / 1e9:.3g}B"),
        )
    for i, N in enumerate(fit.sizes):
        lo, hi = fit.x_range[i]
        for a, b, style in ((lo, hi, "-"), (hi, hi * EXTRAPOLATE, "--")):
            X = np.geomspace(a, b, 50)
            ax.plot(X, np.exp(fit.log_loss(N, X)), style, color=colors.get(N, "k"), lw=1.2)
    if protocol is not None:
        pred = protocol["predictions"]
        held = pred[pred["held_out"]].groupby(["N", "X"]).mean(numeric_only=True).reset_index()
        for N, g in held.groupby("N"):
            ax.plot(g["X"], g["pred"], ":", color="k", lw=1.5)
            ax.fill_between(g["X"], g["lo"], g["hi"], color=colors.get(N, "k"), alpha=0.15, lw=0)
        ax.plot([], [], ":", color="k", label=f"{protocol['protocol']}-model prediction")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(AXIS_LABEL[fit.x_name])
    ax.set_ylabel("test loss L = 1 - pass@1")
    ax.set_title(
        f"log L = -k(N) log X + E(N); k_max {fit.k_max:.3g}, N0 {fit.N0 / 1e9:.3g}B, R² {fit.r2:.3f}"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_k_of_N(fit: MainFit, path: str | Path) -> Path:
    """Each size's own slope with its run-to-run error bar, and k(N) = k_max / (1 + N0 / N) with
    the bootstrap interval and the k_max asymptote."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    sizes = np.asarray(fit.sizes)
    se = np.nan_to_num(np.asarray(fit.k_hat_se))
    ax.errorbar(
        sizes,
        fit.k_hat,
        yerr=1.645 * se,
        fmt="o",
        color="C0",
        capsize=3,
        label="per-size slope (90%)",
    )
    N = np.geomspace(sizes.min() / 3, sizes.max() * 10, 200)
    ax.plot(
        N, fit.k(N), color="C1", label=f"k(N) = {fit.k_max:.3g} / (1 + {fit.N0 / 1e9:.3g}B / N)"
    )
    if fit.draws:
        lo, hi = percentile_ci(fit.k_draws(N).T, fit.level)
        ax.fill_between(
            N, lo, hi, color="C1", alpha=0.2, lw=0, label=f"{fit.level:.0%} bootstrap interval"
        )
    # Scale to the measured slopes: an unpinned k_max (N0 at its bound) can sit 100x above
    # them, and drawn to it every size would lie flat on zero.
    k_hat = np.asarray(fit.k_hat)
    top = 3 * max(float(np.max(k_hat + 1.645 * se)), 1e-3)  # > 0 even if nothing learned
    if fit.k_max <= top:
        ax.axhline(fit.k_max, ls="--", color="grey", lw=1, label="k_max")
    else:
        ax.plot([], [], " ", label=f"k_max {fit.k_max:.3g}: above the chart")
    if (k_hat > 0).all():  # slopes over decades of N: log axis
        ax.set_yscale("log")
        ax.set_ylim(k_hat.min() / 3, top)
    else:
        ax.set_ylim(min(0.0, float(np.min(k_hat - 1.645 * se))) * 1.2, top)
    return _save_k_chart(fig, ax, fit.x_name, path)


def _save_k_chart(fig: Figure, ax, x_name: str, path: str | Path) -> Path:
    """Axes, legend and file of a k-against-N chart."""
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"learning efficiency k ({x_name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_per_size(p: Points, fit: MainFit, path: str | Path) -> Path:
    """One log-log panel per size at its own scale: every run's points, the size's own line
    (log L = -k_hat log X + E_hat) and the joint law, so a shallow trend is not flattened by
    the others' range."""
    m = len(fit.sizes)
    cols = min(m, 3)
    rows = -(-m // cols)
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows))
    for i, N in enumerate(fit.sizes):
        ax = fig.add_subplot(rows, cols, i + 1)
        at = p.N == N
        runs = np.unique(p.run_id[at])
        for r, run in enumerate(runs):
            pts = at & (p.run_id == run)
            ax.plot(p.X[pts], p.L[pts], "o", ms=3, alpha=0.7, color=f"C{r % 10}", label=str(run))
        X = np.geomspace(*fit.x_range[i], 50)
        ax.plot(X, np.exp(-fit.k_hat[i] * np.log(X) + fit.E_hat[i]), "-", color="k", lw=1.2)
        ax.plot(X, np.exp(fit.log_loss(N, X)), "--", color="grey", lw=1)
        se = fit.k_hat_se[i]
        pm = f" ± {se:.2g}" if se is not None and np.isfinite(se) else ""
        ax.set_title(
            rf"{fit.labels[i]}: $\hat{{k}}$ {fit.k_hat[i]:.3g}{pm}, R² {fit.r2_size[i]:.2f}",
            fontsize=9,
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        # narrow ranges get a few plain ticks; log-axis defaults label one decade or none
        for axis, v, fmt in ((ax.xaxis, p.X[at], "%.1e"), (ax.yaxis, p.L[at], "%.3f")):
            axis.set_major_locator(FixedLocator(np.geomspace(v.min(), v.max(), 4)))
            axis.set_minor_locator(NullLocator())
            axis.set_major_formatter(FormatStrFormatter(fmt))
        if len(runs) <= 4:
            ax.legend(fontsize=6)
    fig.supxlabel(AXIS_LABEL[fit.x_name], fontsize=9)
    fig.supylabel("test loss L (log)", fontsize=9)
    fig.suptitle("each size's own log-linear trend (solid) and the joint law (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_k_families(doc: dict, path: str | Path) -> Path | None:
    """The families' learning efficiency against N on one chart (the paper's base against
    instruct comparison): each size's own slope, and k(N) where the family has a law; from a
    fit.json document, so a family without a law (too few sizes) still shows its runs' slopes.
    None when no family has a slope to show."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for i, (name, fam) in enumerate(doc["families"].items()):
        color = f"C{i}"
        law = fam.get("laws", {}).get(doc["x"])
        if law:
            fit = MainFit.from_dict(law)
            ax.plot(fit.sizes, fit.k_hat, "o", color=color, label=f"{name}: per-size slope")
            N = np.geomspace(min(fit.sizes) / 3, max(fit.sizes) * 10, 200)
            ax.plot(N, fit.k(N), color=color, label=f"{name}: k(N), k_max {fit.k_max:.3g}")
            drawn = True
        elif runs := [r for r in fam.get("runs", []) if "k" in r]:
            ax.plot(
                [r["N"] for r in runs],
                [r["k"] for r in runs],
                "x",
                color=color,
                label=f"{name}: per-run slope (no law)",
            )
            drawn = True
    if not drawn:
        return None
    return _save_k_chart(fig, ax, doc["x"], path)
