"""Intra- and inter-model protocols, the per-run predictor, and the comparison of law forms."""

import numpy as np
import pytest

from rayrl.scaling.compare import compare_forms
from rayrl.scaling.fit import FitError, fit_main_law
from rayrl.scaling.laws import k_of_N
from rayrl.scaling.protocols import fit_run, inter_model, intra_model
from rayrl.scaling.synthetic import make_metrics
from rayrl.scaling.table import to_points


@pytest.fixture(scope="module")
def table():
    return make_metrics(k_max=0.15, N0=10e9, sigma=0.012, seed=5)


@pytest.mark.parametrize("trial", range(6))
def test_intra_first_quarter_predicts_final_loss_within_002(trial):
    """Issue 5 acceptance: fitting each synthetic run's first 25% predicts its final loss
    (the noise-free value the run ends at) within 0.02, for every run of the table."""
    rng = np.random.default_rng(trial)
    k_max, N0, sigma = (
        rng.uniform(0.1, 0.2),
        np.exp(rng.uniform(np.log(5e9), np.log(30e9))),
        rng.uniform(0.005, 0.015),
    )
    df = make_metrics(k_max=k_max, N0=N0, sigma=sigma, seed=300 + trial)
    result = intra_model(to_points(df, "compute"), fit_fraction=0.25)
    true_final = df.sort_values("step").groupby("run_id")["true_loss"].last()
    errors = np.array([abs(r["final_pred"] - true_final[r["run_id"]]) for r in result["runs"]])
    print(f"trial {trial}: max |final error| {errors.max():.4f}, mean {errors.mean():.4f}")
    assert len(errors) == 21 and errors.max() < 0.02
    assert all(r["n_fit"] == 25 and r["n_held_out"] == 75 for r in result["runs"])


def test_intra_reports_errors_coverage_and_the_early_law(table):
    result = intra_model(to_points(table, "compute"), fit_fraction=0.25)
    assert result["n_held_out"] == 21 * 75
    assert 0 < result["mae"] < result["max_error"] < 0.1
    assert 0.6 < result["coverage"] <= 1.0
    assert abs(result["law"]["k_max"] / 0.15 - 1) < 0.2  # the law fitted on early points only
    assert {r["k_source"] for r in result["runs"]} == {"run+prior"}
    held = result["predictions"][result["predictions"]["held_out"]]
    assert np.all(held["lo"] <= held["pred"]) and np.all(held["pred"] <= held["hi"])


def test_inter_predicts_the_largest_models_k_and_curve(table):
    result = inter_model(to_points(table, "compute"), n_boot=100)
    k_true = k_of_N(72e9, 0.15, 10e9)
    assert abs(result["k_pred"] / k_true - 1) < 0.1
    assert abs(result["k_obs"] / k_true - 1) < 0.1
    assert result["k_ci"][0] < result["k_pred"] < result["k_ci"][1]
    assert result["N_held_out"] == 72e9 and result["n_held_out"] == 3 * 97
    assert result["mae"] < 0.03 and result["coverage"] > 0.6


def test_inter_intervals_for_two_seeds_stay_positive_and_say_they_are_weak():
    """The tiny study's design (6 sizes, 2 seeds, ~25 evaluations a run, seeds that differ
    in slope): k's intervals stay above 0, the observed slope is checked against an interval
    that adds the held-out runs' own spread, and the result says 2 runs a size are too few."""
    for trial in range(3):
        df = make_metrics(
            sizes=(0.5e9, 1.5e9, 3e9, 7e9, 14e9, 32e9),
            seeds=2,
            points=25,
            k_jitter=0.1,
            seed=40 + trial,
        )
        result = inter_model(to_points(df, "compute"), n_boot=100, seed=trial)
        (lo, hi), (pi_lo, pi_hi) = result["k_ci"], result["k_pi"]
        assert 0 < lo < result["k_pred"] < hi, result["k_ci"]
        assert 0 <= pi_lo < result["k_pred"] < pi_hi
        assert result["k_covered"] == (pi_lo <= result["k_obs"] <= pi_hi)
        assert result["few_runs"].startswith("6 of 6 sizes have fewer than 3 runs")
    three = make_metrics(sizes=(0.5e9, 3e9, 14e9, 72e9), seeds=3, points=12, seed=1)
    assert inter_model(to_points(three, "compute"), n_boot=20)["few_runs"] is None


def test_inter_needs_enough_sizes_below_the_largest(table):
    with pytest.raises(FitError, match="model size"):
        inter_model(to_points(table[table["n_params"] >= 14e9], "compute"))


def test_a_short_run_leans_on_the_cross_run_law(table):
    p = to_points(table, "compute")
    law = fit_main_law(p)
    run = table[table["run_id"] == table["run_id"].iloc[-1]].sort_values("step")
    X, L, N = run["compute_flops"].to_numpy(), run["test_loss"].to_numpy(), run["n_params"].iloc[0]
    alone, two = fit_run(X, L), fit_run(X[:2], L[:2], law, N)
    assert alone.source == "run" and two.source == "prior" and two.k == pytest.approx(law.k(N))
    long = fit_run(X, L, law, N)
    assert long.source == "run+prior" and abs(long.k - alone.k) < abs(two.k - alone.k) + 1e-12
    mean, lo, hi = two.predict(X[-1])
    assert lo < mean < hi
    with pytest.raises(FitError, match="needs 3 points"):
        fit_run(X[:2], L[:2])
    # A run whose compute never moved (every update skipped) leans on the law, or has no fit.
    flat = np.full(4, X[1])
    assert fit_run(flat, L[:4], law, N).source == "prior"
    with pytest.raises(FitError, match="share one X"):
        fit_run(flat, L[:4])


def test_the_main_law_predicts_held_out_points_better_than_the_sigmoid(table):
    result = compare_forms(to_points(table, "compute"), fit_fraction=0.25)
    mae = {r["form"]: r["mae"] for r in result["forms"]}
    assert set(mae) == {
        "main (E free)",
        "main (E smooth)",
        "per-size power law",
        "decomposition (app. D)",
        "sigmoid",
    }
    assert (
        mae["main (E free)"] < mae["sigmoid"]
        and mae["main (E free)"] < mae["decomposition (app. D)"]
    )
    assert result["forms"][0]["mae"] == min(mae.values())


def test_a_form_with_as_many_parameters_as_points_is_not_scored(table):
    """Two early points per run: the per-size forms would interpolate them, so their held-out
    error would rank nothing; they are listed with the reason instead."""
    p = to_points(table, "compute")
    early = p.subset(p.step <= 20)
    result = compare_forms(early.subset(early.run_id == early.run_id[0]), fit_fraction=0.5)
    errors = {r["form"]: r.get("error", "") for r in result["forms"]}
    assert "mae" not in result["forms"][-1]
    assert "free parameters for 1 training points" in errors["decomposition (app. D)"]
    assert "one distinct X" in errors["per-size power law"]


def test_a_law_with_no_seen_spread_is_a_sharp_prior_not_a_crash(table):
    """One run a size on exact lines: no between-run spread and no slope error (the live
    fitter early in a 1-seed study divided by zero here); the run's k is k(N)."""
    law = fit_main_law(to_points(table[table["seed"] == 0], "compute"))
    law.k_spread, law.k_var = 0.0, [0.0] * len(law.k_var)
    run = table[(table["run_id"] == table["run_id"].iloc[0])].head(4)
    N = float(run["n_params"].iloc[0])
    rf = fit_run(run["compute_flops"].to_numpy(float), run["test_loss"].to_numpy(float), law, N)
    assert abs(rf.k - float(law.k(N))) < 1e-6 and rf.source == "run+prior"
