"""Planner: eq. 5 (FLOPs budget), eq. 7 (unique-data budget), eq. 9 (reuse factor)."""

import numpy as np
import pytest

from rayrl.scaling.fit import fit_main_law
from rayrl.scaling.planner import best_size, reuse_study
from rayrl.scaling.synthetic import make_metrics, make_reuse_metrics
from rayrl.scaling.table import to_points


@pytest.fixture(scope="module")
def table():
    return make_metrics(seed=21)


@pytest.mark.parametrize("axis,budget", [("compute", 3e19), ("compute", 1e21), ("data", 2e5)])
def test_best_size_is_the_argmin_of_the_law_with_an_interval(table, axis, budget):
    fit = fit_main_law(to_points(table, axis), n_boot=100)
    answer = best_size(fit, budget)
    losses = [np.exp(fit.log_loss(N, budget)) for N in fit.sizes]
    assert answer["best"]["N"] == fit.sizes[int(np.argmin(losses))]
    assert answer["best"]["lo"] < answer["best"]["test_loss"] < answer["best"]["hi"]
    assert sum(c["p_best"] for c in answer["candidates"]) == pytest.approx(1.0)
    assert answer["axis"] == axis and len(answer["candidates"]) == 7


def test_small_budget_favours_the_size_that_got_more_steps(table):
    """The paper's crossover (fig. 2): at equal compute early on, 32B can beat 72B because it
    took more steps; with a large budget, 72B wins."""
    fit = fit_main_law(to_points(table, "compute"))
    early, late = best_size(fit, 2e19)["best"]["N"], best_size(fit, 1e22)["best"]["N"]
    assert late == 72e9 and early in (32e9, 72e9)
    extrapolated = {c["N"]: c["extrapolated"] for c in best_size(fit, 2e19)["candidates"]}
    assert extrapolated[0.5e9] and not extrapolated[32e9]
    with pytest.raises(ValueError, match="positive"):
        best_size(fit, 0)


def test_reuse_picks_the_largest_tau_within_noise():
    df = make_reuse_metrics(tau_safe=25, overfit=0.05)
    size = reuse_study(df)["sizes"][0]
    assert size["tau_star"] == 25 and size["same_D_total"] and not size["noise_unknown"]
    assert [t["within_noise"] for t in size["taus"]][-2:] == [False, False]
    flat = reuse_study(make_reuse_metrics(overfit=0.0, seed=3))["sizes"][0]
    assert flat["tau_star"] == 100


def test_reuse_with_one_seed_uses_the_rows_standard_error():
    df = make_reuse_metrics(seeds=1)
    assert reuse_study(df)["sizes"][0]["taus"][0]["n_runs"] == 1
    size = reuse_study(df.drop(columns="test_loss_se"))["sizes"][0]
    assert size["noise_unknown"] and size["tau_star"] == 1.0
    with pytest.raises(ValueError, match="two or more reuse_factor"):
        reuse_study(df[df["reuse_factor"] == 1])
