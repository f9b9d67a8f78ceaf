from pathlib import Path

import pytest

from rayrl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_grpo_values():
    g = Config().grpo
    assert (g.clip_low, g.clip_high) == (0.2, 0.2)
    assert g.kl_coef == 0.001 and g.kl_estimator == "k3"
    assert g.loss_agg == "token-mean"
    assert (g.temperature, g.eval_temperature) == (1.0, 0.7)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.source.endswith(name)


M = "ladder:\n  models:\n  - {name: a, hidden: 32, layers: 1, heads: 1, kv_heads: 1, resources: %s}\n"


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("grpo:\n  bogus: 1\n", "grpo.bogus", "unknown key"),
        ("nonsense: 1\n", "nonsense", "unknown key"),
        ("grpo:\n  rollout_n: eight\n", "grpo.rollout_n", "expected int"),
        ("grpo:\n  rollout_n: true\n", "grpo.rollout_n", "expected int"),
        ("grpo:\n  lr: fast\n", "grpo.lr", "expected float"),
        ("grpo:\n  kl_estimator: k9\n", "grpo.kl_estimator", "expected one of"),
        ("grpo:\n  loss_agg: seq-mean\n", "grpo.loss_agg", "expected one of"),
        (
            "grpo:\n  prompts_per_step: 6\n  mini_batches: 4\n",
            "grpo.mini_batches",
            "divisor of grpo.prompts_per_step=6",
        ),
        ("grpo:\n  ppo_epochs: 0\n", "grpo.ppo_epochs", "positive"),
        ("grpo:\n  clip_ratio_c: 0.5\n", "grpo.clip_ratio_c", "above 1"),
        ("grpo:\n  async_steps: 2\n", "grpo.async_steps", "0 or 1"),
        ("grpo:\n  is_cap: 0.5\n", "grpo.is_cap", "at least 1"),
        ("study:\n  seeds: 3\n", "study.seeds", "expected a list"),
        ("grpo: 5\n", "grpo", "expected a mapping"),
        ("grpo:\n  rollout_n: 1\n", "grpo.rollout_n", "at least 2"),
        (
            "grpo:\n  data_budget: 100\n  reuse_factor: 3\n",
            "grpo.reuse_factor",
            "divisor of grpo.data_budget=100",
        ),
        (
            "grpo:\n  data_budget: 100\nstudy:\n  reuse_factor: [1, 7]\n",
            "study.reuse_factor",
            "divisors",
        ),
        ("study:\n  rollout_n: [1, 4]\n", "study.rollout_n", "at least 2"),
        ("grpo:\n  prompts_per_step: -4\n", "grpo.prompts_per_step", "positive"),
        ("resources:\n  learners: 0\n", "resources.learners", ">= 1"),
        ("resources:\n  zero_stage: 5\n", "resources.zero_stage", "0, 1, 2 or 3"),
        (
            "ladder:\n  models:\n  - {name: a, hidden: -8, layers: 2}\n",
            "ladder.models[0].hidden",
            "positive",
        ),
        (
            "ladder:\n  models:\n  - {name: a, hidden: 30, layers: 2, heads: 4}\n",
            "ladder.models[0].heads",
            "divisor",
        ),
        (
            "ladder:\n  models:\n  - {name: a, hidden: 32, layers: 2}\n  - {name: a, hidden: 64, layers: 2}\n",
            "ladder.models",
            "unique",
        ),
        ("study:\n  models: [nope]\n", "study.models", "names of ladder.models entries"),
        ("data:\n  source: guru\n", "data.train_path", "parquet path"),
        ("grpo:\n  temperature: 0\n", "grpo.temperature", "positive"),
        (M % "{device: gpu}", "ladder.models[0].resources.device", "study-wide"),
        (M % "{learner: 4}", "ladder.models[0].resources.learner", "one of"),
        (M % "{learners: many}", "ladder.models[0].resources.learners", "expected int"),
        (M % "{learners: 0}", "ladder.models[0].resources.learners", ">= 1"),
        (M % "{tensor_parallel: 2}", "ladder.models[0].resources.tensor_parallel", "1 on cpu"),
        (M % "4", "ladder.models[0].resources", "expected a mapping"),
        (
            "ladder:\n  pretrain_unboxed_share: 1.5\n",
            "ladder.pretrain_unboxed_share",
            "a share in [0, 1]",
        ),
    ],
)
def test_bad_configs_name_file_key_and_expectation(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg and expected in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "grpo: [\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path, "- 1\n"))


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, "grpo:\n  rollout_n: 4\n")
    assert load_config(path, {"grpo.rollout_n": 16}).grpo.rollout_n == 16
    with pytest.raises(ConfigError, match="grpo.rollout_n"):
        load_config(path, {"grpo.rollout_n": 1})


def test_sweeps_union_without_the_cross_product(tmp_path):
    path = write(
        tmp_path,
        "ladder:\n  models:\n  - {name: a, hidden: 32, layers: 1, heads: 1, kv_heads: 1}\n"
        "  - {name: b, hidden: 64, layers: 1, heads: 2, kv_heads: 1}\n"
        "grpo:\n  rollout_n: 4\n  data_budget: 64\n"
        "study:\n  models: [a, b]\n  seeds: [0, 1]\n  sweeps:\n  - {name: size}\n"
        "  - {name: reuse, models: [a], seeds: [0], reuse_factor: [1, 4]}\n",
    )
    trials = load_config(path).trials()
    keys = [(t.model, t.rollout_n, t.reuse_factor, t.seed) for t in trials]
    assert len(keys) == len(set(keys)) == 5  # 2 models x 2 seeds, plus a at tau 4
    shared = next(t for t in trials if (t.model, t.reuse_factor, t.seed) == ("a", 1, 0))
    assert shared.sweeps == ("size", "reuse")
    assert all(t.rollout_n == 4 for t in trials)  # empty axis: the grpo value
    # study.seeds runs the size sweep twice; the reuse sweep's own seeds keep it to seed 0
    assert {t.seed for t in trials if t.sweeps == ("size",)} == {0, 1}
    assert {t.seed for t in trials if t.reuse_factor == 4} == {0}
    # a's tau-4 trial runs next to a's others, not after b's: one engine build per model
    assert [t.model for t in trials] == ["a", "a", "a", "b", "b"]


def test_study_seeds_default_to_the_grpo_seed_and_each_seed_is_its_own_run(tmp_path):
    base = (
        "ladder:\n  models:\n  - {name: a, hidden: 32, layers: 1, heads: 1, kv_heads: 1}\n"
        "grpo:\n  seed: 7\n  data_budget: 64\n"
        "study:\n  models: [a]\n"
    )
    assert [t.seed for t in load_config(write(tmp_path, base)).trials()] == [7]
    trials = load_config(write(tmp_path, base + "  seeds: [1, 2]\n")).trials()
    assert [t.seed for t in trials] == [1, 2]
    assert len({t.run_id for t in trials}) == 2


def test_a_models_resources_override_the_study_wide_pools(tmp_path):
    from rayrl.study.tuner import run_cpus, trial_resources

    path = write(
        tmp_path,
        "ladder:\n  models:\n  - {name: a, hidden: 32, layers: 1, heads: 1, kv_heads: 1}\n"
        "  - {name: b, hidden: 64, layers: 1, heads: 2, kv_heads: 1,\n"
        "     resources: {learners: 3, cpus_per_actor: 2}}\n"
        "resources:\n  learners: 2\n  reward_workers: 2\n"
        "study:\n  models: [a, b]\n",
    )
    cfg = load_config(path)
    a, b = cfg.resources_for("a"), cfg.resources_for("b", "base")
    assert (a.learners, a.cpus_per_actor, a.reward_workers) == (2, 1.0, 2)
    assert (b.learners, b.cpus_per_actor, b.reward_workers) == (3, 2.0, 2)
    assert cfg.resources_for("/some/model/path") == cfg.resources
    # driver + 1 rollout + learners + reward workers (at most 0.5 CPU each)
    assert [sum(x["CPU"] for x in trial_resources(cfg, m).bundles) for m in "ab"] == [
        0.1 + 1 + 2 + 1,
        0.1 + 2 + 6 + 1,
    ]
    assert run_cpus(cfg) == 9.1 and run_cpus(cfg, [("a", "base")]) == 4.1


def test_dumped_config_loads_back_equal(tmp_path):
    from rayrl.config import dump_config

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    dump_config(cfg, tmp_path / "again.yaml")
    again = load_config(tmp_path / "again.yaml")
    again.source = cfg.source
    assert again == cfg
