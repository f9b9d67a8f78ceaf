"""The report's "Variants" section: a searched study's recipes compared by their fitted laws.

Per family, one row per variant: the main law (k_max, N0 with intervals, or each size's k̂
when the sizes cannot fit k(N)), each size's E, the R², and ScaleRL's sigmoid per size,
R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) with intervals (Khatri et al. 2025). A figure
overlays the variants' loss-against-compute curves with their sigmoid fits, and a verdict
names the best variant at the largest measured compute and at the planner's budget, and
says whether the intervals separate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import norm  # noqa: E402

from rayrl.metrics import law_groups, split_group  # noqa: E402
from rayrl.scaling.compare import fit_sigmoid  # noqa: E402
from rayrl.scaling.fit import FitError, MainFit  # noqa: E402
from rayrl.scaling.planner import best_size  # noqa: E402
from rayrl.scaling.table import to_points  # noqa: E402

LEVEL = 0.9
PLAN_FACTOR = 10  # the planner's budget in the report: ten times the largest measured compute


def variant_groups(fit: dict) -> dict[str, list[str]]:
    """family -> its law groups, where the family has more than one variant."""
    out: dict[str, list[str]] = {}
    for name in fit["families"]:
        out.setdefault(split_group(name)[0], []).append(name)
    return {f: sorted(g) for f, g in out.items() if len(g) > 1}


def section(df: pd.DataFrame, fit: dict, study_dir: Path) -> list[str]:
    """The report's lines: nothing when the study has one variant per family."""
    families = variant_groups(fit)
    if not families:
        return []
    lines = ["## Variants", ""]
    group = law_groups(df)
    for family, names in families.items():
        rows = {name: df[group == name] for name in names}
        sig = {name: _sigmoid(r) for name, r in rows.items()}
        png = plot(rows, sig, study_dir / f"variants_{family}.png")
        lines += [f"### Family {family}", "", f"![variants]({png.name})", ""]
        lines += table(fit, names, sig)
        lines += verdict(fit, rows)
    return lines


def _sigmoid(rows: pd.DataFrame) -> dict[str, Any] | None:
    try:
        p = to_points(rows, "compute")
        predict, params = fit_sigmoid(p, LEVEL)
    except (ValueError, FitError):  # MetricsError included: no usable points
        return None
    return {"predict": predict, "sizes": sorted(set(p.N)), "labels": p.labels, **params}


def _ci(value: float, ci: list[float] | None, fmt: str = ".3g") -> str:
    if not ci or any(v is None or not np.isfinite(v) for v in ci):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def table(fit: dict, names: list[str], sig: dict[str, dict | None]) -> list[str]:
    lines = [
        f"Main law on compute ({LEVEL:.0%} intervals) and ScaleRL's sigmoid per size, "
        "A (asymptotic pass rate), B (steepness) and C_mid (FLOPs at half the gain):",
        "",
        "| variant | k_max | N0 | k̂ per size | E per size | R² | A per size | B per size | C_mid per size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        entry = fit["families"][name]
        law = entry.get("laws", {}).get("compute")
        if law:
            ci = law.get("ci") or {}
            k_max, N0 = _ci(law["k_max"], ci.get("k_max")), _ci(law["N0"], ci.get("N0"))
            k_hat = ", ".join(f"{k:.3g}" for k in law["k_hat"])
            E = ", ".join(f"{e:.3g}" for e in law["E_hat"] or law["E_params"])
            r2 = f"{law['r2']:.3f}"
        else:  # too few sizes for k(N): each run's own slope
            k_max = N0 = r2 = E = "n/a"
            k_hat = ", ".join(f"{r['k']:.3g}" for r in entry.get("runs", []) if "k" in r) or "n/a"
        s = sig[name]
        if s is None:
            A = B = C_mid = "n/a"
        else:
            A, B, C_mid = (
                ", ".join(_ci(v, c) for v, c in zip(s[key], s["ci"][key]))
                for key in ("A", "B", "C_mid")
            )
        variant = entry.get("variant", name)
        lines.append(f"| {variant} | {k_max} | {N0} | {k_hat} | {E} | {r2} | {A} | {B} | {C_mid} |")
    return lines + [""]


def observed_at_top(rows: pd.DataFrame) -> tuple[float, float, float]:
    """The largest size's final loss (mean over its runs), with its interval at LEVEL from
    the seed spread, else the evaluation's SE."""
    top = rows[rows["n_params"] == rows["n_params"].max()]
    final = top.sort_values("step").groupby("run_id").tail(1)
    mean = float(final["test_loss"].mean())
    if len(final) > 1:
        se = float(final["test_loss"].std(ddof=1) / np.sqrt(len(final)))
    else:
        se = float(final.get("test_loss_se", pd.Series([np.nan])).iloc[0])
    z = norm.ppf(0.5 + LEVEL / 2)
    return mean, mean - z * se, mean + z * se


def _best(scores: dict[str, tuple[float, float, float]]) -> tuple[str, bool]:
    """The variant with the lowest loss, and whether its interval clears every other's."""
    best = min(scores, key=lambda n: scores[n][0])
    separate = all(scores[best][2] < scores[n][1] for n in scores if n != best)
    return best, separate


def verdict(fit: dict, rows: dict[str, pd.DataFrame]) -> list[str]:
    names = list(rows)
    measured = {n: observed_at_top(r) for n, r in rows.items()}
    best, apart = _best(measured)
    fmt = {n: f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for n, (m, lo, hi) in measured.items()}
    variant = {n: fit["families"][n].get("variant", n) for n in names}
    lines = [
        "At the largest measured compute (the largest size's final loss, "
        f"{LEVEL:.0%} intervals): "
        + "; ".join(f"{variant[n]} {fmt[n]}" for n in names)
        + f". **Best: {variant[best]}**, "
        + ("its interval clear of every other's." if apart else "but the intervals overlap.")
    ]
    laws = {n: fit["families"][n].get("laws", {}).get("compute") for n in names}
    if all(laws.values()):
        top = max(float(r["compute_flops"].max()) for r in rows.values())
        budget = PLAN_FACTOR * top
        planned = {}
        for n, law in laws.items():
            b = best_size(MainFit.from_dict(law), budget)["best"]
            planned[n] = (b["test_loss"], b.get("lo", np.nan), b.get("hi", np.nan))
        best_p, apart_p = _best(planned)
        lines.append(
            f"At the planner's budget ({budget:.3g} FLOPs, each variant's best size): "
            + "; ".join(
                f"{variant[n]} {m:.3f} [{lo:.3f}, {hi:.3f}]" for n, (m, lo, hi) in planned.items()
            )
            + f". **Best: {variant[best_p]}**, "
            + ("its interval clear of every other's." if apart_p else "but the intervals overlap.")
        )
    else:
        lines.append(
            "At the planner's budget: no verdict, since not every variant has a compute law "
            "(k(N) needs three sizes)."
        )
    return lines + [""]


def plot(rows: dict[str, pd.DataFrame], sig: dict[str, dict | None], path: Path) -> Path:
    """Each variant's mean loss per size against compute, with its sigmoid fit."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>"
    for i, (name, r) in enumerate(rows.items()):
        trained = r[r["compute_flops"] > 0]
        color = colors[i % len(colors)]
        for j, (N, g) in enumerate(trained.groupby("n_params")):
            mean = g.groupby("step")[["compute_flops", "test_loss"]].mean()
            ax.plot(
                mean["compute_flops"],
                mean["test_loss"],
                markers[j % len(markers)],
                color=color,
                ms=4,
                label=f"{split_group(name)[1]}, N={N:.3g}",
            )
            s = sig[name]
            if s is not None and N in s["sizes"]:
                C = np.geomspace(mean["compute_flops"].min(), mean["compute_flops"].max(), 50)
                ax.plot(C, s["predict"](np.full_like(C, N), C), "-", color=color, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("test loss 1 - pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
