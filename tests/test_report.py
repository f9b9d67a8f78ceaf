"""The study report from a study directory alone: the per-size trend table and figures."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rayrl.scaling.fit import fit_main_law, saturation
from rayrl.scaling.protocols import inter_model
from rayrl.scaling.synthetic import make_metrics, make_reuse_metrics
from rayrl.scaling.table import to_points
from rayrl.study.report import _law_line, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_report_shows_every_sizes_own_trend(tmp_path):
    sizes = (0.5e9, 3e9, 14e9, 72e9)
    table = pd.concat(
        [
            make_metrics(sizes=sizes, seeds=2, points=12, seed=1),
            make_reuse_metrics(taus=(4, 16), N=3e9, points=12, seed=9),
        ],
        ignore_index=True,
    )
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    report = write_report(tmp_path).read_text()

    fit = json.loads((tmp_path / "fit.json").read_text())["families"]["synthetic"]
    law = fit["laws"]["compute"]
    assert law["n_models"] == len(sizes)
    for i, label in enumerate(law["labels"]):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2].startswith(f"{law['k_hat'][i]:.4g} ± ")
        assert float(cells[4]) == round(law["r2_size"][i], 3)
    ci = law["ci"]
    assert (
        f"{law['n_models']} sizes; intervals from {ci['n_boot']} whole-run resamples within "
        f"sizes, widened {ci['widen']:.2g}x for {ci['dof']:.2g} degrees of freedom" in report
    )
    proto = fit["protocol"]
    lo, hi = proto["k_pi"]
    assert (
        f"k predicted {proto['k_pred']:.3g} (90% interval {lo:.3g} to {hi:.3g}), "
        f"observed {proto['k_obs']:.3g}" in report
    )
    # two seeds a size: the report says the run bootstrap cannot measure their spread
    assert proto["few_runs"].startswith("4 of 4 sizes have fewer than 3 runs")
    assert f"Interval caveat: {proto['few_runs']}." in report
    # the intra-model check from each run's first quarter, and the saturation verdict
    intra = json.loads((tmp_path / "fit_intra.json").read_text())["families"]["synthetic"]
    assert intra["protocol"]["fit_fraction"] == 0.25
    assert f"held-out loss MAE {intra['protocol']['mae']:.3g} (within the paper's 0.02)" in report
    identified, verdict = saturation(law)
    assert identified, verdict  # N0 = 13.1e9 lies inside 0.5e9 to 72e9
    assert f"- saturation of k(N) on compute: {verdict}." in report
    # the reuse table holds the swept size only
    reuse = report.split("## Data reuse")[1].split("## Rollout")[0]
    assert "| 3,000,000,000 | 4 |" in reuse and "| 72,000,000,000 |" not in reuse
    for figure in (
        "fit_synthetic_per_size_compute.png",
        "fit_data_synthetic_per_size_data.png",
        "reuse.png",
    ):
        assert f"]({figure})" in report and (tmp_path / figure).stat().st_size > 1000


def test_report_scores_every_benchmark_of_the_suite(tmp_path):
    table = make_metrics(sizes=(0.5e9, 3e9), seeds=1, points=6, seed=2)
    table["test_loss_gsm8k"] = table["test_loss"] * 0.5
    table["test_loss_gsm8k_se"] = 0.01
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    report = write_report(tmp_path).read_text()

    suite = report.split("## Evaluation suite")[1].split("## Planner")[0]
    assert "| run | test_loss | test_loss_gsm8k |" in suite
    final = table.sort_values("step").groupby("run_id").tail(1)
    for _, r in final.iterrows():
        assert (
            f"| {r['run_id']} | {r['test_loss']:.3f} ± {r['test_loss_se']:.3f} | "
            f"{r['test_loss_gsm8k']:.3f} ± 0.010 |" in suite
        )
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000
    assert "## pass@k" not in report  # the table has no pass@k columns


def test_report_draws_pass_at_k_against_compute(tmp_path):
    table = make_metrics(sizes=(0.5e9, 3e9), seeds=1, points=6, seed=2)
    table["pass_at_1"], table["pass_at_4"] = 1 - table["test_loss"], 1 - table["test_loss"] ** 2
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")
    report = write_report(tmp_path).read_text()
    assert "## pass@k" in report and "![pass@k](pass_at_k.png)" in report
    assert (tmp_path / "pass_at_k.png").stat().st_size > 1000


def test_report_has_a_section_per_family_each_as_fitted_alone(tmp_path):
    from rayrl.scaling.document import fit_table

    sizes = (0.5e9, 3e9, 14e9)
    table = pd.concat(
        [
            make_metrics(sizes=sizes, seeds=2, points=10, seed=3, family="base"),
            make_metrics(sizes=sizes, seeds=2, points=10, seed=4, family="instruct", k_max=0.3),
        ],
        ignore_index=True,
    )
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    report = write_report(tmp_path).read_text()

    fit = json.loads((tmp_path / "fit.json").read_text())
    assert sorted(fit["families"]) == ["base", "instruct"]
    assert "![fit_k_vs_N_families.png](fit_k_vs_N_families.png)" in report
    for family, rows in table.groupby("family"):
        alone = fit_table(rows, n_boot=0)[0]["families"][family]["laws"]["compute"]
        law = fit["families"][family]["laws"]["compute"]
        assert law["k_max"] == pytest.approx(alone["k_max"], rel=1e-6)
        section = report.split(f"### Family {family}")[1].split("### Family")[0].split("## ")[0]
        assert f"k_max = {law['k_max']:.4g}" in section
        assert f"![fit_{family}_per_size_compute.png]" in section
        assert f"{law['n_points']} points from {law['n_runs']} runs" in section
    # figures keep the families apart: one curve per (model, family)
    assert (tmp_path / "fit_k_vs_N_families.png").stat().st_size > 1000


def test_saturation_is_not_identified_on_a_ladder_below_the_knee(tmp_path):
    """Every size far below N0: k(N) grows linearly across the ladder and k_max is unseen."""
    table = make_metrics(sizes=(0.5e9, 1e9, 2e9), N0=2e12, seeds=2, points=10, seed=5)
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    report = write_report(tmp_path).read_text()

    law = json.loads((tmp_path / "fit.json").read_text())["families"]["synthetic"]["laws"]
    law = law["compute"]
    identified, verdict = saturation(law)
    # the N where the fitted k(N) reaches k_max / 2 (N0), its interval, and the ladder below it
    lo, hi = law["ci"]["N0"]
    assert not identified and law["N0"] > 2e9, verdict
    assert verdict.startswith(
        f"not identified: the fitted k(N) would reach half of k_max ({law['k_max']:.3g}) at "
        f"N = N0 = {law['N0']:.3g} (90% CI {lo:.3g} to {hi:.3g})"
    ), verdict
    assert "stops below the knee" in verdict
    assert f"- saturation of k(N) on compute: {verdict}." in report


def test_one_run_a_size_claims_no_interval():
    """With one seed a size the whole-run bootstrap redraws the fit itself (zero-width
    intervals): the law line, the saturation verdict and the inter-model check say so."""
    table = make_metrics(sizes=(0.5e9, 3e9, 14e9, 72e9), seeds=1, points=12, seed=3)
    law = fit_main_law(to_points(table, "compute"), n_boot=20).to_dict()
    line = _law_line({"laws": {"compute": law}}, "compute")
    assert "k_max = " in line and "(no interval: no size has 2 runs to resample)" in line
    identified, verdict = saturation(law)
    assert not identified and verdict.endswith("but has no interval"), verdict
    proto = inter_model(to_points(table, "compute"), n_boot=20)
    assert proto["few_runs"].startswith("every size has one run")


def test_runs_table_splits_the_loss_into_format_and_wrong_answers(tmp_path):
    table = make_metrics(sizes=(0.5e9, 3e9), seeds=1, points=6, seed=2)
    # answered rises from 0.5 to 1.0 over each run: the format, learnt
    table["answer_rate"] = 0.5 + 0.5 * table["step"] / table.groupby("run_id")["step"].transform(
        "max"
    )
    table.to_parquet(tmp_path / "metrics.parquet")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "config.yaml")

    runs = write_report(tmp_path).read_text().split("## Runs")[1].split("## Scaling")[0]

    ordered = table.sort_values("step").groupby("run_id")
    for (run, first), (_, last) in zip(
        ordered.head(1).groupby("run_id"), ordered.tail(1).groupby("run_id")
    ):
        first, last = first.iloc[0], last.iloc[0]
        a0 = first["answer_rate"]
        acc0, acc1 = (1 - first["test_loss"]) / a0, 1 - last["test_loss"]
        row = next(line for line in runs.splitlines() if line.startswith(f"| {run} |"))
        assert a0 < 1 and row.endswith(f"| {a0:.3f} → 1.000 | {acc0:.3f} → {acc1:.3f} |"), row

    table.drop(columns="answer_rate").to_parquet(tmp_path / "metrics.parquet")
    runs = write_report(tmp_path).read_text().split("## Runs")[1].split("## Scaling")[0]
    assert runs.count("| n/a | n/a |") == table["run_id"].nunique()
