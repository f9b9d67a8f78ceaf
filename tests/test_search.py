"""study.search: variants drawn before Ray starts, checked against the config, carried by
trials and rows, fitted apart, and compared in the report."""

from pathlib import Path

import pandas as pd
import pytest

from rayrl import cli
from rayrl.config import ConfigError, load_config
from rayrl.scaling.document import fit_table
from rayrl.scaling.synthetic import make_metrics
from rayrl.search import label, variants
from rayrl.study import variants as variants_section

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SEARCH = {
    "study.family": ["base"],
    "study.sweeps": [],
    "study.search": {"grpo.clip_high": [0.2, 0.28], "grpo.lr": {"loguniform": [5.0e-5, 5.0e-4]}},
    "study.num_samples": 2,
}


def test_the_search_crosses_the_grid_with_seeded_draws_and_every_trial_runs_each_variant():
    cfg = load_config(SMOKE, SEARCH)
    trials = cfg.trials()
    assert len(trials) == 4 * 2  # 2 clip values x 2 lr draws, x 2 sizes
    by_variant = {}
    for t in trials:
        by_variant.setdefault(t.variant, set()).add(t.model)
    assert len(by_variant) == 4 and all(m == {"smoke-1", "smoke-2"} for m in by_variant.values())
    lrs = {dict(t.overrides)["grpo.lr"] for t in trials}
    assert len(lrs) == 2 and all(5e-5 <= lr <= 5e-4 for lr in lrs)
    assert len({t.run_id for t in trials}) == len(trials)  # two variants never share a dir
    # the same draws every time the study is read (a resume), other draws with another seed
    assert [t.run_id for t in load_config(SMOKE, SEARCH).trials()] == [t.run_id for t in trials]
    other = load_config(SMOKE, {**SEARCH, "study.search_seed": 1}).trials()
    assert {dict(t.overrides)["grpo.lr"] for t in other} != lrs


def test_a_variant_runs_its_own_config_and_the_default_has_no_overrides():
    cfg = load_config(SMOKE, SEARCH)
    t = cfg.trials()[0]
    run_cfg = cfg.with_overrides(dict(t.overrides))
    assert run_cfg.grpo.clip_high == dict(t.overrides)["grpo.clip_high"]
    assert run_cfg.study.search == {}
    plain = load_config(SMOKE)
    assert {t.variant for t in plain.trials()} == {"default"}
    assert "default" not in plain.trials()[0].run_id


def test_samplers_and_labels():
    space = {"a.x": {"randint": [1, 4]}, "a.y": {"choice": ["p", "q"]}, "a.z": {"uniform": [0, 1]}}
    drawn = variants(space, 20, seed=3)
    assert len(drawn) == 20
    assert {d["a.x"] for d in drawn} <= {1, 2, 3} and {d["a.y"] for d in drawn} <= {"p", "q"}
    assert all(0 <= d["a.z"] <= 1 for d in drawn)
    assert label({"grpo.lr": 0.000123456, "grpo.clip_high": 0.28}) == (
        "grpo.clip_high=0.28,grpo.lr=0.0001235"
    )
    assert variants({}, 5, 0) == [{}]


def test_a_sweep_fixes_a_key():
    cfg = load_config(
        SMOKE,
        {
            "study.family": ["base"],
            "study.search": {"grpo.clip_high": [0.2, 0.28]},
            "study.sweeps": [
                {"name": "size"},
                {
                    "name": "rollout",
                    "models": ["smoke-1"],
                    "rollout_n": [2, 4],
                    "search": {"grpo.clip_high": [0.28]},
                },
            ],
        },
    )
    rollout = [t for t in cfg.trials() if "rollout" in t.sweeps]
    assert {dict(t.overrides)["grpo.clip_high"] for t in rollout} == {0.28}


@pytest.mark.parametrize(
    "search, expected",
    [
        ({"grpo.nope": [1, 2]}, "grpo.nope"),
        ({"grpo.lr": {"normal": [0, 1]}}, "unknown sampler 'normal'"),
        ({"grpo.lr": {"uniform": [5e-4, 5e-5]}}, "lo < hi"),
        ({"grpo.lr": {"loguniform": [0.0, 1e-3]}}, "0 < lo"),
        ({"grpo.rollout_n": [1, 4]}, "the value 1 is refused"),
        ({"grpo.clip_low": {"uniform": [0.1, 1.5]}}, "the value 1.5 is refused"),
        ({"grpo.lr": "fast"}, "expected a list of values or one sampler"),
        ({"study.max_concurrent": [1, 2]}, "not the study's own"),
    ],
)
def test_bad_search_spaces_exit_2_before_any_run(monkeypatch, capsys, tmp_path, search, expected):
    monkeypatch.setattr(cli, "_init_ray", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "study"
    args = ["study", str(SMOKE), "--out", str(out), "--set", f"study.search={search!r}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "study.search" in err and "Traceback" not in err
    assert not out.exists()  # nothing written under the study


def test_num_samples_must_be_positive():
    with pytest.raises(ConfigError, match="study.num_samples"):
        load_config(SMOKE, {**SEARCH, "study.num_samples": 0})


def test_laws_are_kept_apart_per_variant_and_the_report_compares_them(tmp_path):
    slow = make_metrics(seed=1, k_max=0.2, N0=1e9).assign(variant="grpo.clip_high=0.2")
    fast = make_metrics(seed=2, k_max=0.3, N0=1e9).assign(variant="grpo.clip_high=0.28")
    df = pd.concat([slow, fast], ignore_index=True)
    doc = fit_table(df, n_boot=100)[0]
    names = sorted(doc["families"])
    assert names == ["synthetic | grpo.clip_high=0.2", "synthetic | grpo.clip_high=0.28"]
    k = {
        doc["families"][n]["variant"]: doc["families"][n]["laws"]["compute"]["k_max"] for n in names
    }
    assert k["grpo.clip_high=0.2"] == pytest.approx(0.2, rel=0.2)
    assert k["grpo.clip_high=0.28"] == pytest.approx(0.3, rel=0.2)
    lines = "\n".join(variants_section.section(df, doc, tmp_path))
    assert "## Variants" in lines and "grpo.clip_high=0.28" in lines
    assert "**Best: grpo.clip_high=0.28**" in lines  # the faster learner, at both budgets
    assert lines.count("**Best: grpo.clip_high=0.28**") == 2
    assert (tmp_path / "variants_synthetic.png").stat().st_size > 1000
    # one variant per family: no section
    assert variants_section.section(slow, fit_table(slow, n_boot=0)[0], tmp_path) == []


def test_the_draws_depend_on_the_range_not_on_how_yaml_spelled_it():
    """YAML reads 5e-05 as a string and 5.0e-5 as a float; `--set` and a file must draw alike."""
    floats = variants({"grpo.lr": {"loguniform": [5.0e-5, 5.0e-4]}}, 2, seed=0)
    strings = variants({"grpo.lr": {"loguniform": ["5e-05", "0.0005"]}}, 2, seed=0)
    assert floats == strings


def test_a_tune_users_params_make_a_trial_of_its_variant():
    """Study.trainable's params: dotted keys beside trial fields; the rest from the variant."""
    from rayrl.study.tuner import trial_of

    cfg = load_config(SMOKE)
    trial, variant = trial_of({"model": "smoke-2", "grpo.clip_high": 0.28, "grpo.seed": 5}, cfg)
    assert (trial.model, trial.family, trial.seed) == ("smoke-2", "base", 5)
    assert trial.variant == "grpo.clip_high=0.28,grpo.seed=5"
    assert variant.grpo.clip_high == 0.28 and cfg.grpo.clip_high == 0.2
    study = cfg.trials()[0]
    again, same = trial_of({"trial": study.to_params()}, cfg)
    assert again == study and same.grpo == cfg.grpo
