"""`rayrl fit` / `rayrl plan` through fit_command and plan_command, as the CLI calls them."""

import json

import numpy as np
import pandas as pd
import pytest

from rayrl.metrics import MetricsError
from rayrl.scaling.document import fit_command, fit_table, plan_command
from rayrl.scaling.synthetic import make_metrics, make_reuse_metrics

PNG = b"\x89PNG\r\n\x1a\n"
FAMILY = "synthetic"  # make_metrics' family


def strict_json(path):
    return json.loads(
        path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: non-JSON {c}")
    )


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "metrics.parquet"
    make_metrics(seed=31).to_parquet(path)
    return path


@pytest.mark.parametrize("protocol", ["intra", "inter"])
def test_fit_writes_fit_json_and_figures(metrics, tmp_path, protocol):
    out = tmp_path / "fit.json"
    summary = fit_command(str(metrics), protocol=protocol, out=str(out), n_boot=50)
    assert strict_json(out)["status"] == summary["status"] == "ok"
    doc, summary = strict_json(out)["families"][FAMILY], summary["families"][FAMILY]
    assert set(doc["laws"]) == {"compute", "data"} and len(doc["laws"]["compute"]["draws"]) == 50
    assert "draws" not in summary["laws"]["compute"]
    law = doc["laws"]["compute"]
    assert law["r2"] > 0.99 and law["n_points"] == 2100 and law["ci"]["k_max"][0] < law["k_max"]
    assert doc["protocol"]["protocol"] == protocol and doc["protocol"]["mae"] < 0.03
    assert doc["comparison"]["forms"][0]["mae"] <= doc["comparison"]["forms"][-1]["mae"]
    assert [p.split("/")[-1] for p in doc["figures"]] == [
        "fit_synthetic_loss_vs_compute.png",
        "fit_synthetic_k_vs_N.png",
        "fit_synthetic_per_size_compute.png",
    ]
    for p in doc["figures"]:
        assert open(p, "rb").read(8) == PNG


def test_plan_answers_compute_and_data_budgets(metrics, tmp_path):
    out = tmp_path / "fit.json"
    fit_command(str(metrics), out=str(out), figures=False, n_boot=50)
    text, planned = plan_command(str(out), compute_budget=1e21, data_budget=2e5)
    assert planned
    assert "compute budget 1e+21 FLOPs (eq. 5): best model 72B" in text
    assert "data budget 2e+05 samples (eq. 7): best model 72B" in text
    assert "P(best)" in text
    text, planned = plan_command(str(out))
    assert "nothing planned" in text and not planned


def test_plan_answers_the_reuse_question(tmp_path):
    csv = tmp_path / "reuse.csv"
    make_reuse_metrics().to_csv(csv, index=False)
    summary = fit_command(str(csv), out=str(tmp_path / "fit.json"), n_boot=20)
    assert (
        summary["status"] == summary["families"][FAMILY]["status"] == "partial"
    )  # one model size: no k(N), but the reuse study stands
    text, planned = plan_command(str(tmp_path / "fit.json"), compute_budget=1e20)
    assert planned
    assert "tau* = 25 is the largest reuse factor within noise of tau = 1" in text
    assert "has no compute-axis law" in text


def test_bad_rows_give_a_flagged_fit_and_unusable_files_a_clear_error(tmp_path):
    df = make_metrics(seed=32)
    df.loc[:9, "test_loss"] = np.nan
    df.loc[10:14, "test_loss"] = -1.0
    csv = tmp_path / "bad.csv"
    df.to_csv(csv, index=False)
    summary = fit_command(str(csv), out=str(tmp_path / "fit.json"), figures=False, n_boot=0)
    assert summary["status"] == "flagged"
    assert summary["families"][FAMILY]["excluded_rows"] == {
        "test_loss is NaN": 10,
        "test_loss outside (0, 1]": 5,
    }
    with pytest.raises(MetricsError, match="no such metrics file"):
        fit_command(str(tmp_path / "missing.parquet"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(MetricsError, match="expected a .parquet or .csv"):
        fit_command(str(tmp_path / "m.txt"))
    df[["run_id", "step"]].to_csv(tmp_path / "thin.csv", index=False)
    with pytest.raises(MetricsError, match=r"thin.csv: missing column\(s\) \['family'"):
        fit_command(str(tmp_path / "thin.csv"))


def test_the_cli_flags_match_the_command_signatures(metrics, tmp_path):
    from rayrl.cli import parser

    out = tmp_path / "f.json"
    args = parser().parse_args(
        ["fit", str(metrics), "--x", "data", "--out", str(out), "--no-figures", "--n-boot", "10"]
    )
    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "func")}
    assert fit_command(**kwargs)["x"] == "data"
    args = parser().parse_args(["plan", str(out), "--data-budget", "1e5"])
    kwargs = {k: v for k, v in vars(args).items() if k not in ("verb", "func")}
    assert "eq. 7" in plan_command(**kwargs)[0]


def test_each_family_is_fitted_apart_and_alone_gives_the_same_fit(metrics, tmp_path):
    base = pd.read_parquet(metrics)
    instruct = make_metrics(seed=77, k_max=0.25, N0=3e9).assign(family="instruct")
    both = pd.concat([base, instruct], ignore_index=True)
    path = tmp_path / "both.parquet"
    both.to_parquet(path)
    summary = fit_command(str(path), out=str(tmp_path / "f.json"), n_boot=0)
    assert sorted(summary["families"]) == ["instruct", FAMILY]
    for family, rows in both.groupby("family"):
        alone = fit_table(rows, n_boot=0)[0]["families"][family]
        mixed = summary["families"][family]
        for axis in ("compute", "data"):
            assert mixed["laws"][axis]["n_runs"] == 21
            assert mixed["laws"][axis]["k_max"] == pytest.approx(alone["laws"][axis]["k_max"])
            assert mixed["laws"][axis]["N0"] == pytest.approx(alone["laws"][axis]["N0"])
    assert summary["families"]["instruct"]["laws"]["compute"]["k_max"] == pytest.approx(
        0.25, rel=0.15
    )
    # one k(N) figure compares the families; each family has its own three
    assert [p.split("/")[-1] for p in summary["figures"]] == ["f_k_vs_N_families.png"]
    assert len(summary["families"]["instruct"]["figures"]) == 3
    only = fit_command(str(path), family="instruct", out=str(tmp_path / "i.json"), n_boot=0)
    assert list(only["families"]) == ["instruct"]
    with pytest.raises(MetricsError, match="no rows with family == 'chat'"):
        fit_command(str(path), family="chat", out=str(tmp_path / "c.json"), n_boot=0)
    text = plan_command(str(tmp_path / "f.json"), compute_budget=1e21)[0]
    assert "family instruct: status" in text and f"family {FAMILY}: status" in text
    assert (
        plan_command(str(tmp_path / "f.json"), compute_budget=1e21, family="instruct")[0].count(
            "best model"
        )
        == 1
    )


def test_rayrl_fit_family_flag(metrics, tmp_path, capsys):
    from rayrl.cli import main

    both = pd.concat([pd.read_parquet(metrics), pd.read_parquet(metrics).assign(family="instruct")])
    path = tmp_path / "both.parquet"
    both.to_parquet(path)
    out = tmp_path / "fit.json"
    args = [str(path), "--out", str(out), "--no-figures", "--n-boot", "0"]
    assert main(["fit", *args, "--family", "instruct"]) == 0
    assert list(strict_json(out)["families"]) == ["instruct"]
    assert main(["fit", *args]) == 0
    assert sorted(strict_json(out)["families"]) == ["instruct", FAMILY]
    assert "instruct: ok, compute-axis law, data-axis law" in capsys.readouterr().out


def test_fit_a_law_to_one_minus_pass_at_k(metrics, tmp_path):
    """rayrl fit --metric pass_at_4: the law of L = 1 - pass@k, from the pass@k columns."""
    df = pd.read_parquet(metrics)
    # pass@4 >= pass@1: here a loss of L^2 where test_loss is L, a law of twice the slope
    df["pass_at_4"] = 1 - df["test_loss"] ** 2
    path = tmp_path / "k.parquet"
    df.to_parquet(path)
    one = fit_command(str(path), out=str(tmp_path / "one.json"), figures=False, n_boot=0)
    four = fit_command(
        str(path), out=str(tmp_path / "four.json"), figures=False, n_boot=0, metric="pass_at_4"
    )
    assert four["metric"] == "pass_at_4"
    k1 = one["families"][FAMILY]["laws"]["compute"]["k_max"]
    k4 = four["families"][FAMILY]["laws"]["compute"]["k_max"]
    assert k4 == pytest.approx(2 * k1, rel=0.05)
    with pytest.raises(
        MetricsError, match=r"no column 'pass_at_8' \(pass@k columns: \['pass_at_4'\]\)"
    ):
        fit_command(str(path), out=str(tmp_path / "x.json"), metric="pass_at_8")
