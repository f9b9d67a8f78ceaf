"""The study report: report.md with PNG figures, from the study directory alone.

Reads metrics.parquet (all trials), config.yaml (which sweep each trial belongs to)
and scheduler.jsonl; writes fit.json / fit_data.json through `rayrl fit`'s code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from rayrl.config import load_config  # noqa: E402
from rayrl.metrics import (  # noqa: E402
    BENCHMARK,
    HELD_OUT_PASS_AT,
    UNITS,
    families,
    read_metrics,
    x_column,
)
from rayrl.scaling.document import fit_command, plan_command  # noqa: E402
from rayrl.scaling.fit import saturation  # noqa: E402
from rayrl.scaling.planner import reuse_study  # noqa: E402
from rayrl.scaling.table import law_rows  # noqa: E402
from rayrl.study import variants  # noqa: E402
from rayrl.study.scheduler import read_decisions  # noqa: E402

REPORT_BOOT = 300  # bootstrap draws: intervals for a report, not a paper table
INTRA_MAE = 0.02  # the paper's standard for the intra-model protocol's held-out error


def label(family: str, model: str) -> str:
    """A figure's name for one model of one family: base and instruct never share a line."""
    return f"{model} ({family})"


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("step").groupby("run_id").tail(1)


def plot_reuse(df: pd.DataFrame, path: Path) -> Path | None:
    """Final test loss against the reuse factor tau, per model (paper fig. 8)."""
    final = final_rows(df)
    if final["reuse_factor"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (family, model), g in final.groupby(["family", "model"]):
        if g["reuse_factor"].nunique() < 2:
            continue
        agg = g.groupby("reuse_factor")["test_loss"].agg(["mean", "std", "count"]).reset_index()
        se = (agg["std"].fillna(0) / agg["count"] ** 0.5).where(
            agg["count"] > 1, g.groupby("reuse_factor")["test_loss_se"].mean().values
        )
        ax.errorbar(
            agg["reuse_factor"],
            agg["mean"],
            yerr=se,
            marker="o",
            capsize=3,
            label=label(family, model),
        )
    ax.set_xscale("log")
    ax.set_xlabel("reuse factor tau (fixed total data)")
    ax.set_ylabel("final test loss 1 - pass@1")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rollout_n(df: pd.DataFrame, path: Path) -> Path | None:
    """Test loss against compute and data for each GRPO group size (paper fig. 13)."""
    ab = df[df["reuse_factor"] == 1]
    models = [k for k, g in ab.groupby(["family", "model"]) if g["rollout_n"].nunique() > 1]
    if not models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for family, model in models:
        runs = ab[(ab["family"] == family) & (ab["model"] == model)]
        for n, g in runs.groupby("rollout_n"):
            mean = g.groupby("step")[["compute_flops", "data_samples", "test_loss"]].mean()
            mean = mean[mean["compute_flops"] > 0]
            name = f"{label(family, model)} n={n}"
            axes[0].plot(mean["compute_flops"], mean["test_loss"], marker=".", label=name)
            axes[1].plot(mean["data_samples"], mean["test_loss"], marker=".", label=name)
    for ax, xl in zip(axes, ("compute C (FLOPs)", "data D (samples)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("test loss")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def benchmark_columns(df: pd.DataFrame) -> list[str]:
    """The evaluation suite's loss columns (test_loss_<name>), held-out test_loss first."""
    names = [c for c in df.columns if (m := BENCHMARK.fullmatch(c)) and not m.group(2)]
    return ["test_loss", *sorted(names)]


def plot_benchmarks(df: pd.DataFrame, path: Path) -> Path | None:
    """Each benchmark's test loss against compute, per model, over the size sweep's runs
    (paper appendix B)."""
    cols = benchmark_columns(df)
    if len(cols) < 2:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        trained = df[df["compute_flops"] > 0]
        for (family, _, model), g in trained.groupby(["family", "n_params", "model"]):
            mean = g.groupby("step")[["compute_flops", col]].mean()
            ax.plot(mean["compute_flops"], mean[col], marker=".", label=label(family, model))
        ax.set_xscale("log")
        ax.set_title(
            col.removeprefix("test_loss_") if col != "test_loss" else "held-out", fontsize=9
        )
        ax.set_xlabel("compute C (FLOPs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test loss 1 - pass@1")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pass_at_k(df: pd.DataFrame, path: Path) -> Path | None:
    """Held-out pass@k against compute per size, one panel per k (grpo.pass_k): does RL
    raise pass@k, or only pass@1?"""
    cols = sorted(
        (c for c in df.columns if HELD_OUT_PASS_AT.fullmatch(c)), key=lambda c: int(c[8:])
    )
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    trained = df[df["compute_flops"] > 0]
    for ax, col in zip(axes[0], cols):
        for (family, _, model), g in trained.groupby(["family", "n_params", "model"]):
            mean = g.groupby("step")[["compute_flops", col]].mean()
            ax.plot(mean["compute_flops"], mean[col], marker=".", label=label(family, model))
        ax.set_xscale("log")
        ax.set_title(col.replace("pass_at_", "pass@"), fontsize=9)
        ax.set_xlabel("compute C (FLOPs)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scheduler_summary(study_dir: Path, df: pd.DataFrame, x_col: str) -> dict[str, Any]:
    """The resource X (compute or data, the scheduler's axis `x_col`) saved by stopped
    trials, and whether any of them would have won."""
    decisions = read_decisions(study_dir)
    stops = {d["run_id"]: d for d in decisions if d["action"] == "stop"}
    final = final_rows(df).set_index("run_id")
    spent = float(final[x_col].sum()) if len(final) else 0.0
    saved = sum(max(d["x_end"] - d["x_now"], 0.0) for d in stops.values())
    finished = final.drop(index=[r for r in stops if r in final.index])
    best = float(finished["test_loss"].min()) if len(finished) else float("nan")
    would_win = [
        r for r, d in stops.items() if d["predicted"] is not None and d["predicted"] < best
    ]
    return {
        "decisions": len(decisions),
        "stopped": stops,
        "spent": spent,
        "saved": saved,
        "saved_fraction": saved / (spent + saved) if spent + saved > 0 else 0.0,
        "best_finished_loss": best,
        "stopped_that_would_have_won": would_win,
    }


def _fit(
    study_dir: Path, rollout_n: int, x: str, out: str, protocol: str = "inter", main: bool = True
) -> dict[str, Any]:
    """`rayrl fit` on the study's rows, whose law rows are those of the live fitter
    (table.law_rows at the study's group size); main=False skips the main law's bootstrap
    and figures (a fit for its protocol alone)."""
    try:
        return fit_command(
            str(study_dir / "metrics.parquet"),
            x=x,
            protocol=protocol,
            out=str(study_dir / out),
            figures=main,
            n_boot=REPORT_BOOT if main else 0,
            rollout_n=rollout_n,
        )
    except ValueError as e:  # MetricsError included: no family has usable rows
        return {"status": "error", "error": str(e), "families": {}}


def _family_section(name: str, fit_c: dict, fit_d: dict, fit_i: dict) -> list[str]:
    """One family's laws on both axes, the saturation verdict, its per-size trend table,
    figures and both protocol checks."""
    fam_c, fam_d, fam_i = (
        f["families"].get(name, {"status": "error", "error": f.get("error")})
        for f in (fit_c, fit_d, fit_i)
    )
    lines = [f"### Family {name}", "", _law_line(fam_c, "compute"), _law_line(fam_d, "data")]
    if law := fam_c.get("laws", {}).get("compute"):
        lines.append(f"- saturation of k(N) on compute: {saturation(law)[1]}.")
    lines.append("")
    lines += _trend_table(fam_c)
    for fam in (fam_c, fam_d):
        for fig in fam.get("figures", []):
            rel = Path(fig).name
            lines += [f"![{rel}]({rel})", ""]
    if fam_c.get("protocol"):
        lines += [_protocol_line(fam_c["protocol"]), ""]
    if fam_i.get("protocol"):
        lines += [_intra_line(fam_i["protocol"]), ""]
    return lines


def _law_line(summary: dict[str, Any], axis: str) -> str:
    law = summary.get("laws", {}).get(axis)
    if not law:
        return f"- {axis}: no law fitted ({summary.get('error') or summary.get('status')})"
    ci = law.get("ci") or {}

    def fmt(name: str) -> str:
        if ci and not (ci.get("dof") or 0) > 0:  # NaN (null in JSON): no size has 2 runs
            return f"{name} = {law[name]:.4g} (no interval: no size has 2 runs to resample)"
        lo, hi = (ci.get(name) or [float("nan"), float("nan")])[:2]
        return f"{name} = {law[name]:.4g} (90% CI {lo:.4g} to {hi:.4g})"

    # How far the whole-run draws were widened, and on how many degrees of freedom of
    # run-to-run spread: 2 runs a size give about 1, and the interval is mostly that widening.
    widened = (
        f"; intervals from {ci['n_boot']} whole-run resamples within sizes, widened "
        f"{ci['widen']:.2g}x for {ci['dof']:.2g} degrees of freedom of run-to-run spread"
        if (ci.get("dof") or 0) > 0
        else ""
    )
    return (
        f"- {axis}: {fmt('k_max')}, {fmt('N0')}; R² = {law['r2']:.3f}, loss = {law['cost']:.4g}, "
        f"{law['n_points']} points from {law['n_runs']} runs of {law['n_models']} sizes{widened}"
    )


def _trend_table(summary: dict[str, Any]) -> list[str]:
    """Each size's own log-log line on compute: is the trend there, and how straight is it."""
    law = summary.get("laws", {}).get("compute")
    if not law or not law.get("r2_size"):
        return []
    lines = [
        "Each size's own line, log L = -k̂ log C + Ê, runs pooled (per-size panels below):",
        "",
        "| size | N | k̂ ± SE (runs) | k̂ / SE | R² of the size's line | residual SD of log L under the joint law |",
        "|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(law["labels"]):
        k, se = law["k_hat"][i], law["k_hat_se"][i]
        se_txt, t_txt = (f"{se:.3g}", f"{k / se:.1f}") if se else ("n/a (one run)", "n/a")
        r2 = law["r2_size"][i]
        lines.append(
            f"| {label} | {law['sizes'][i]:,.0f} | {k:.4g} ± {se_txt} | {t_txt} | "
            f"{'n/a' if r2 is None else f'{r2:.3f}'} | {law['resid_sd'][i]:.3f} |"
        )
    return lines + [""]


def _protocol_line(proto: dict[str, Any]) -> str:
    """The inter-model check in words: the largest size predicted from the smaller ones."""
    if "error" in proto:
        return f"Inter-model protocol: not run ({proto['error']})."
    se = proto.get("k_obs_se")
    lo, hi = proto["k_pi"]
    law_lo, law_hi = proto["k_ci"]
    few = f" Interval caveat: {proto['few_runs']}." if proto.get("few_runs") else ""
    return (
        f"Inter-model protocol (fit every size but the largest, N = {proto['N_held_out']:.3g}, "
        f"then predict its curve from its first {proto['anchor_points']} evaluations; intervals "
        f"from a bootstrap over whole runs within each size): "
        f"k predicted {proto['k_pred']:.3g} ({proto['level']:.0%} interval {lo:.3g} to {hi:.3g}), "
        f"observed {proto['k_obs']:.3g}{f' ± {se:.2g}' if se is not None else ''} "
        f"({'inside' if proto['k_covered'] else 'outside'} the interval; the law's k(N) alone, "
        f"without the held-out runs' own spread: {law_lo:.3g} to {law_hi:.3g}); "
        f"held-out loss MAE {proto['mae']:.3g}, max error {proto['max_error']:.3g}, "
        f"{proto['coverage']:.0%} of {proto['n_held_out']} points inside their intervals.{few}"
    )


def _intra_line(proto: dict[str, Any]) -> str:
    """The intra-model check in words: each run's rest predicted from its first quarter."""
    if "error" in proto:
        return f"Intra-model protocol: not run ({proto['error']})."
    verdict = "within" if proto["mae"] <= INTRA_MAE else "above"
    return (
        f"Intra-model protocol (fit each run's first {proto['fit_fraction']:.0%} of steps, "
        f"predict the rest): held-out loss MAE {proto['mae']:.3g} ({verdict} the paper's "
        f"{INTRA_MAE}), max error {proto['max_error']:.3g}, final-step MAE "
        f"{proto['final_mae']:.3g}; {proto['coverage']:.0%} of {proto['n_held_out']} points "
        f"inside their {proto['level']:.0%} intervals."
    )


def _answers(first: pd.Series, last: pd.Series) -> str:
    """The answered share and the accuracy among answers, at a run's first and last rows."""
    if pd.isna(first.get("answer_rate")) or pd.isna(last.get("answer_rate")):
        return "n/a | n/a"  # a table from before answer_rate was logged

    def accuracy(r: pd.Series) -> float:
        return (1 - r["test_loss"]) / r["answer_rate"] if r["answer_rate"] > 0 else float("nan")

    return (
        f"{first['answer_rate']:.3f} → {last['answer_rate']:.3f} | "
        f"{accuracy(first):.3f} → {accuracy(last):.3f}"
    )


def _runs(df: pd.DataFrame, sched: dict[str, Any]) -> list[str]:
    """Each run's final loss, split into format and wrong answers."""
    lines: list[str] = []
    final = final_rows(df)
    lines += [
        "## Runs",
        "",
        "What a run learns: L = 1 - pass@1 splits into samples with no answer the verifier can"
        " extract (1 - answered, the format) and wrong answers (1 - accuracy of the answers).",
        "",
        "| run | N | rollout n | tau | seed | steps | final test loss ± SE | answered, first → last |"
        " accuracy of answers, first → last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = df.sort_values("step").groupby("run_id").head(1).set_index("run_id")
    for _, r in final.sort_values(["n_params", "rollout_n", "reuse_factor", "seed"]).iterrows():
        stopped = " (stopped)" if r["run_id"] in sched["stopped"] else ""
        lines.append(
            f"| {r['run_id']}{stopped} | {r['n_params']:,} | {r['rollout_n']} | {r['reuse_factor']} | "
            f"{r['seed']} | {r['step']} | {r['test_loss']:.3f} ± {r.get('test_loss_se', float('nan')):.3f} | "
            f"{_answers(first.loc[r['run_id']], r)} |"
        )
    return lines


def _laws(df: pd.DataFrame, study_dir: Path, n: int, fits: tuple[dict, dict, dict]) -> list[str]:
    """The main law per family on both axes, its rows, checks and the variants compared."""
    lines: list[str] = []
    fit_c, fit_d, fit_i = fits
    scaling, rule = law_rows(df, n)
    lines += ["", "## Scaling laws: log L = -k(N)·log X + E(N), k(N) = k_max / (1 + N0/N)", ""]
    left_out = ", ".join(f"{k}: {v} rows" for k, v in rule["excluded"].items()) or "none"
    lines += [
        f"Fitted per family; fit.json status {fit_c['status']}. Rows of the laws (the live "
        f"fitter's too): tau = 1 at rollout n = {n}, {len(rule['runs'])} runs; left out: "
        f"{left_out}.",
        "",
    ]
    for fig in fit_c.get("figures", []):  # the families' k(N) side by side
        rel = Path(fig).name
        lines += [f"![{rel}]({rel})", ""]
    for name in families(scaling):
        lines += _family_section(name, fit_c, fit_d, fit_i)
    lines += variants.section(scaling, fit_c, study_dir)
    return lines


def _reuse(df: pd.DataFrame, n: int, reuse_png: Path | None) -> list[str]:
    """The eq. 9 study at the main group size."""
    lines: list[str] = []
    reuse_rows = df[df["rollout_n"] == n]
    lines += ["## Data reuse (fixed total data, unique subset D_total / tau)", ""]
    if reuse_png and reuse_rows["reuse_factor"].nunique() > 1:
        lines += [
            "![reuse](reuse.png)",
            "",
            "| family | N | tau | final test loss | SE | within noise of tau = 1 |",
            "|---|---|---|---|---|---|",
        ]
        for family, rows in reuse_rows.groupby("family"):
            if rows["reuse_factor"].nunique() < 2:
                continue
            for size in reuse_study(rows)["sizes"]:
                if len(size["taus"]) < 2:
                    continue  # a size outside the reuse sweep has nothing to compare
                for t in size["taus"]:
                    lines.append(
                        f"| {family} | {size['n_params']:,.0f} | {t['tau']:g} | {t['test_loss']:.3f} | "
                        f"{t['se']:.3f} | {'yes' if t['within_noise'] else 'no'} |"
                    )
                lines.append(
                    f"| {family} | | largest tau within noise (eq. 9): **{size['tau_star']:g}** | | | |"
                )
        lines.append("")
    else:
        lines += ["No reuse sweep in this study.", ""]
    return lines


def _benchmarks(df: pd.DataFrame, bench_png: Path | None) -> list[str]:
    """The evaluation suite's losses per run."""
    lines: list[str] = []
    final = final_rows(df)
    lines += ["## Evaluation suite", ""]
    if bench_png:
        lines += [
            "![benchmarks](benchmarks.png)",
            "",
            "| run | " + " | ".join(benchmark_columns(df)) + " |",
            "|---|" + "---|" * len(benchmark_columns(df)),
        ]
        for _, r in final.sort_values(["n_params", "run_id"]).iterrows():
            cells = [f"{r[c]:.3f} ± {r[c + '_se']:.3f}" for c in benchmark_columns(df)]
            lines.append(f"| {r['run_id']} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No evaluation sets beyond the held-out one in this study.", ""]
    return lines


def _planner(df: pd.DataFrame, study_dir: Path, fit_c: dict, fit_d: dict) -> list[str]:
    """The planner's answers at the study's largest compute, ten times it, and its data."""
    lines: list[str] = []
    final = final_rows(df)
    lines += ["## Planner", ""]
    if any(fam["laws"] for fam in fit_c["families"].values()):
        top = float(final["compute_flops"].max())
        top_d = float(final["data_samples"].max())
        for budget in (top, variants.PLAN_FACTOR * top):
            lines += [
                "```",
                plan_command(str(study_dir / "fit.json"), compute_budget=budget)[0],
                "```",
                "",
            ]
        if any(fam["laws"] for fam in fit_d["families"].values()):
            lines += [
                "```",
                plan_command(str(study_dir / "fit_data.json"), data_budget=top_d)[0],
                "```",
                "",
            ]
    else:
        lines += ["No law to plan with (see the fit status above).", ""]
    return lines


def _scheduler(sched: dict[str, Any], x: str) -> list[str]:
    """What the law scheduler stopped, and what it saved."""
    lines: list[str] = []
    lines += ["## Scheduler", ""]
    unit = UNITS[x]
    lines += [
        f"{sched['decisions']} decisions logged in scheduler.jsonl; {len(sched['stopped'])} trials stopped, "
        f"saving {sched['saved']:.3g} {unit} ({sched['saved_fraction']:.1%} of what the study "
        f"would have spent). Stopped trials predicted to beat the best finished loss "
        f"({sched['best_finished_loss']:.3f}): {sched['stopped_that_would_have_won'] or 'none'}.",
        "",
    ]
    for run_id, d in sched["stopped"].items():
        lines.append(
            f"- {run_id} at step {d['step']}: {d['reason']} (observed {d['observed']:.3f})"
        )
    return lines


def write_report(study_dir: Path) -> Path:
    """Write study_dir/report.md and its figures; returns the report's path."""
    study_dir = Path(study_dir)
    cfg = load_config(study_dir / "config.yaml")
    df = read_metrics(study_dir / "metrics.parquet")
    n = cfg.grpo.rollout_n
    fits = (
        _fit(study_dir, n, "compute", "fit.json"),
        _fit(study_dir, n, "data", "fit_data.json"),
        _fit(study_dir, n, "compute", "fit_intra.json", "intra", main=False),
    )
    reuse_png = plot_reuse(df[df["rollout_n"] == n], study_dir / "reuse.png")
    rollout_png = plot_rollout_n(df, study_dir / "rollout_n.png")
    bench_png = plot_benchmarks(law_rows(df, n)[0], study_dir / "benchmarks.png")
    pass_png = plot_pass_at_k(law_rows(df, n)[0], study_dir / "pass_at_k.png")
    sched = scheduler_summary(study_dir, df, x_column(cfg.study.x))
    final = final_rows(df)
    lines = [
        f"# rayrl study report: {cfg.study.name}",
        "",
        f"{df['run_id'].nunique()} runs, {len(df)} metric rows, "
        f"{final['compute_flops'].sum():.3g} FLOPs of training compute (6·N·tokens).",
        "",
    ]
    lines += _runs(df, sched) + _laws(df, study_dir, n, fits) + _reuse(df, n, reuse_png)
    lines += ["## Rollout n", ""]
    lines += (
        ["![rollout n](rollout_n.png)", ""]
        if rollout_png
        else ["No rollout-n sweep in this study.", ""]
    )
    lines += _benchmarks(df, bench_png)
    if pass_png:  # `rayrl fit --metric pass_at_<k>` fits a law to 1 - pass@k
        lines += ["## pass@k", "", "![pass@k](pass_at_k.png)", ""]
    lines += _planner(df, study_dir, fits[0], fits[1])
    lines += _scheduler(sched, cfg.study.x)
    report = study_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
