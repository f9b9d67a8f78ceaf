"""The fit document: a metrics table in, fit.json + figures out (`rayrl fit`, the live
fitter, the report), and the planner's answer on it (`rayrl plan`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from rayrl.metrics import (
    AXES,
    HELD_OUT_PASS_AT,
    UNITS,
    LawKey,
    MetricsError,
    families,
    law_groups,
    read_metrics,
    split_group,
    x_column,
)
from rayrl.scaling.bootstrap import N_BOOT
from rayrl.scaling.compare import compare_forms
from rayrl.scaling.figures import plot_k_families, plot_k_of_N, plot_loss_curves, plot_per_size
from rayrl.scaling.fit import FitError, MainFit, fit_main_law
from rayrl.scaling.planner import best_size, reuse_study
from rayrl.scaling.protocols import fit_run, inter_model, intra_model
from rayrl.scaling.table import law_rows, to_points


def _json_safe(obj):
    """Plain JSON: numpy scalars to Python, NaN and inf to null."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _run_slopes(p) -> list[dict]:
    """Each run's own log-log slope: what is left to report when no law can be fitted."""
    out = []
    for run in np.unique(p.run_id):
        i = np.flatnonzero(p.run_id == run)
        i = i[np.argsort(p.step[i])]
        try:
            rf = fit_run(p.X[i], p.L[i])
            out.append(
                {
                    "run_id": str(run),
                    "N": float(p.N[i[0]]),
                    "n_points": len(i),
                    "k": rf.k,
                    "E": rf.E,
                }
            )
        except FitError as e:
            out.append(
                {"run_id": str(run), "N": float(p.N[i[0]]), "n_points": len(i), "error": str(e)}
            )
    return out


STATUS_ORDER = ("ok", "flagged", "partial", "error")  # a study's status is its worst family's


def fit_table(
    df: pd.DataFrame,
    x: str = "compute",
    protocol: str | None = None,
    fit_fraction: float = 0.25,
    family: str | None = None,
    n_boot: int = N_BOOT,
    E_form: str = "free",
    loss: str = "linear",
    source: str = "metrics",
    rollout_n: int | None = None,
    metric: str = "test_loss",
) -> tuple[dict, dict[str, dict]]:
    """Fit the main law of every family (or only `family`) on every X axis the rows carry.

    Returns the fit.json document, {"families": {family: its fit}, "status": the worst
    family's, ...}, and per family the objects for figures (points, fit and protocol result
    of the chosen axis). A family's status: "ok"; "flagged" when rows or runs were dropped or
    a parameter sits on a bound; "partial" when the chosen axis has no law (e.g. one model
    size), with per-run slopes; "error" when it has no usable rows (raised instead when it is
    the only family). The laws take the rows of table.law_rows (`rollout_n`: the main group
    size), and the document says which (`rows`). metric: the loss the law is fitted to,
    test_loss (1 - pass@1) or a pass@k column (pass_at_<k>: L = 1 - pass@k).
    """
    if protocol not in (None, "intra", "inter"):
        raise ValueError(f"protocol must be 'intra', 'inter' or None, got {protocol!r}")
    x_column(x)
    if "family" not in df.columns:
        raise MetricsError(
            f"{source}: missing column(s) ['family'] (rayrl/DESIGN.md, the metric row)"
        )
    df = loss_of(df, metric, source)
    names = families(df)
    if family is not None and family not in names:
        raise MetricsError(f"{source}: no rows with family == {family!r} (have {names})")
    names = [family] if family is not None else names
    if not names:
        raise MetricsError(f"{source}: no rows")
    main, rule = law_rows(df, rollout_n)
    doc: dict = {"source": source, "x": x, "metric": metric, "rows": rule, "families": {}}
    objects: dict[str, dict] = {}
    group, main_group = law_groups(df), law_groups(main)
    for name in names:
        rows = main[main_group == name]
        # The reuse study: every tau at the main group size.
        n = rule.get("rollout_n")
        reuse = df[(group == name) & ((df["rollout_n"] == n) if n else True)]
        try:
            doc["families"][name], objects[name] = _fit_family(
                rows, reuse, x, protocol, fit_fraction, n_boot, E_form, loss, f"{source} [{name}]"
            )
        except MetricsError as e:
            if len(names) == 1:
                raise
            doc["families"][name] = {"status": "error", "error": str(e), "warnings": [], "laws": {}}
    for name, entry in doc["families"].items():  # a law group is a family and a variant
        fam, variant = split_group(name)
        entry.update(family=fam, variant=variant)
    doc["status"] = max((f["status"] for f in doc["families"].values()), key=STATUS_ORDER.index)
    return _json_safe(doc), objects


def loss_of(df: pd.DataFrame, metric: str, source: str) -> pd.DataFrame:
    """The rows with test_loss (and its SE) taken from `metric`: 1 - pass@k for pass_at_<k>."""
    if metric == "test_loss":
        return df
    if not HELD_OUT_PASS_AT.fullmatch(metric):
        raise MetricsError(f"{source}: --metric expected test_loss or pass_at_<k>, got {metric!r}")
    if metric not in df.columns:
        have = sorted(c for c in df.columns if HELD_OUT_PASS_AT.fullmatch(c)) or "none"
        raise MetricsError(f"{source}: no column {metric!r} (pass@k columns: {have})")
    se = df[f"{metric}_se"] if f"{metric}_se" in df.columns else float("nan")
    return df.assign(test_loss=1 - df[metric], test_loss_se=se)  # L = 1 - pass@k


def _fit_family(
    df: pd.DataFrame,
    reuse: pd.DataFrame,
    x: str,
    protocol: str | None,
    fit_fraction: float,
    n_boot: int,
    E_form: str,
    loss: str,
    source: str,
) -> tuple[dict, dict]:
    """One family's fit document and figure objects (see fit_table)."""
    doc: dict = {"status": "ok", "warnings": [], "laws": {}}
    objects: dict = {}
    for axis, column in AXES.items():
        if axis != x and column not in df.columns:
            continue
        try:
            p = to_points(df, axis, None, source)
        except MetricsError as e:
            if axis == x:
                raise  # nothing usable on the chosen axis: a clear error, not a result
            doc["warnings"].append(f"{axis} law: {e}")
            continue
        if axis == x:
            doc["excluded_rows"] = p.excluded
        try:
            law = fit_main_law(p, E_form=E_form, loss=loss, n_boot=n_boot)
        except FitError as e:
            doc["warnings"].append(f"{axis} law: {e}")
            if axis == x:
                doc.update(status="partial", error=str(e), runs=_run_slopes(p))
                objects["points"] = p
            continue
        doc["laws"][axis] = law.to_dict()
        doc["warnings"] += [f"{axis} law: {w}" for w in law.warnings]
        if axis == x:
            objects.update(points=p, fit=law)
    if doc["status"] == "ok" and doc["warnings"]:
        doc["status"] = "flagged"
    if protocol and "fit" in objects:
        p = objects["points"]
        try:
            result = intra_model(p, fit_fraction) if protocol == "intra" else inter_model(p)
            objects["protocol"] = result
            doc["protocol"] = {k: v for k, v in result.items() if k != "predictions"}
            doc["comparison"] = compare_forms(p, fit_fraction)
        except FitError as e:
            doc["protocol"] = {"protocol": protocol, "error": str(e)}
            doc["status"] = "flagged"
    if "reuse_factor" in reuse.columns and reuse["reuse_factor"].nunique() > 1:
        doc["reuse"] = reuse_study(reuse)
    return doc, objects


def without_draws(doc: dict) -> dict:
    """A fit.json document with its bootstrap draws left out (for printing and summaries)."""
    out = {**doc, "families": {}}
    for name, fam in doc["families"].items():
        laws = {a: {k: v for k, v in law.items() if k != "draws"} for a, law in fam["laws"].items()}
        out["families"][name] = {**fam, "laws": laws}
    return out


def laws_of(doc: dict) -> dict[LawKey, MainFit]:
    """Every law of a fit.json document, by (axis, family)."""
    return {
        LawKey(axis, name): MainFit.from_dict(law)
        for name, fam in doc["families"].items()
        for axis, law in fam["laws"].items()
    }


def write_json(doc: dict, path: Path) -> None:
    """Write atomically: readers (the report, `rayrl plan`) never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def fit_command(
    metrics: str,
    x: str = "compute",
    protocol: str | None = None,
    fit_fraction: float = 0.25,
    out: str = "fit.json",
    figures: bool = True,
    family: str | None = None,
    n_boot: int = N_BOOT,
    E_form: str = "free",
    loss: str = "linear",
    rollout_n: int | None = None,
    metric: str = "test_loss",
) -> dict:
    """Read METRICS.{parquet,csv}, fit each family (or only `family`), write fit.json and PNG
    figures beside it: per family STEM_FAMILY_{loss_vs_X,k_vs_N,per_size_X}.png, and with two
    or more families STEM_k_vs_N_families.png. Returns fit.json without the bootstrap draws.
    Raises MetricsError on unusable input."""
    doc, objects = fit_table(
        read_metrics(metrics),
        x,
        protocol,
        fit_fraction,
        family,
        n_boot,
        E_form,
        loss,
        source=str(metrics),
        rollout_n=rollout_n,
        metric=metric,
    )
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if figures:
        stem = out_path.with_suffix("")
        for name, obj in objects.items():
            if "fit" not in obj:
                continue
            doc["families"][name]["figures"] = [
                str(
                    plot_loss_curves(
                        obj["points"],
                        obj["fit"],
                        f"{stem}_{name}_loss_vs_{x}.png",
                        obj.get("protocol"),
                    )
                ),
                str(plot_k_of_N(obj["fit"], f"{stem}_{name}_k_vs_N.png")),
                str(plot_per_size(obj["points"], obj["fit"], f"{stem}_{name}_per_size_{x}.png")),
            ]
        if len(doc["families"]) > 1:
            compared = plot_k_families(doc, f"{stem}_k_vs_N_families.png")
            doc["figures"] = [str(compared)] if compared else []
    write_json(doc, out_path)
    return {**without_draws(doc), "out": str(out_path)}


def _format_best(answer: dict, eq: str, unit: str) -> list[str]:
    b = answer["best"]
    interval = f" [{b['lo']:.4f}, {b['hi']:.4f}]" if "lo" in b else ""
    lines = [
        f"{answer['axis']} budget {answer['budget']:.3g} {unit} ({eq}): best model {b['model']} "
        f"(N = {b['N']:.3g}), predicted test loss {b['test_loss']:.4f}{interval}",
        f"  {'model':>8} {'N':>9} {'loss':>7} {'interval':>17} {'P(best)':>8}",
    ]
    for c in answer["candidates"]:
        interval = f"[{c['lo']:.3f}, {c['hi']:.3f}]" if "lo" in c else ""
        p_best = f"{c['p_best']:.2f}" if "p_best" in c else ""
        flag = "  (extrapolated)" if c["extrapolated"] else ""
        lines.append(
            f"  {c['model']:>8} {c['N']:9.3g} {c['test_loss']:7.4f} {interval:>17} {p_best:>8}{flag}"
        )
    return lines


def read_fit(path: str) -> dict:
    """A fit.json document, checked for the shape the planner reads."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such fit file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: not a JSON document ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("families"), dict):
        raise MetricsError(
            f"{path}: expected a fit document (an object with 'families', as `rayrl fit` "
            f"writes), got {type(doc).__name__}"
            + (" without 'families'" if isinstance(doc, dict) else "")
        )
    for name, fam in doc["families"].items():
        laws = fam.get("laws") if isinstance(fam, dict) else None
        if not isinstance(laws, dict):
            raise MetricsError(f"{path}: families.{name} has no 'laws' object")
        for axis, law in laws.items():
            try:
                MainFit.from_dict(law)
            except (TypeError, ValueError) as e:
                raise MetricsError(
                    f"{path}: families.{name}.laws.{axis} is not a law ({e})"
                ) from None
    return doc


def plan_command(
    fit_json: str,
    compute_budget: float | None = None,
    data_budget: float | None = None,
    family: str | None = None,
) -> tuple[str, bool]:
    """The planner's printable answer for each family (or only `family`): eq. 5 for a FLOPs
    budget, eq. 7 for a unique-data budget, eq. 9 when the fit holds a reuse study; and
    whether any answer was given."""
    doc = read_fit(fit_json)
    fams = doc["families"]
    if family is not None and family not in fams:
        raise MetricsError(f"{fit_json}: no family {family!r} (have {sorted(fams)})")
    for flag, budget in (("--compute-budget", compute_budget), ("--data-budget", data_budget)):
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise MetricsError(f"{flag}: expected a positive budget, got {budget}")
    lines = [f"{fit_json}: status {doc.get('status')}"]
    planned = False
    for name, fam in fams.items():
        if family is not None and name != family:
            continue
        lines.append(f"family {name}: status {fam.get('status')}")
        for budget, axis, eq in (
            (compute_budget, "compute", "eq. 5"),
            (data_budget, "data", "eq. 7"),
        ):
            if budget is None:
                continue
            if axis not in fam["laws"]:
                lines.append(
                    f"{axis} budget: {fit_json} has no {axis}-axis law for {name} "
                    f"({fam.get('error', 'not fitted')})"
                )
                continue
            planned = True
            law = MainFit.from_dict(fam["laws"][axis])
            lines += _format_best(best_size(law, budget), eq, UNITS[axis])
        for size in fam.get("reuse", {}).get("sizes", []):
            planned = True
            lines += _format_reuse(size)
    if not planned:
        lines.append(
            "nothing planned: give a compute or data budget for a fitted law, or fit a table "
            "with a reuse study"
        )
    return "\n".join(lines), planned


def _format_reuse(size: dict) -> list[str]:
    if "error" in size:
        return [f"reuse (eq. 9), N = {size['n_params']:.3g}: {size['error']}"]
    lines = [
        f"reuse (eq. 9), N = {size['n_params']:.3g}: tau* = {size['tau_star']:g} is the largest reuse factor "
        f"within noise of tau = 1; lowest loss at tau = {size['tau_min_loss']:g}"
        + ("" if size["same_D_total"] in (True, None) else " (warning: runs differ in D_total)")
    ]
    for t in size["taus"]:
        within = {True: "within noise", False: "worse", None: "noise unknown"}[t["within_noise"]]
        lines.append(
            f"  tau {t['tau']:>6g}: loss {t['test_loss']:.4f} ± {t['se']:.4f} (n={t['n_runs']}), {within}"
        )
    return lines


__all__ = [
    "MetricsError",
    "fit_command",
    "fit_table",
    "laws_of",
    "plan_command",
    "read_fit",
    "without_draws",
]
