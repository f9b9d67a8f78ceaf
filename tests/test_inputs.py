"""Every bad input the one-contract issue listed: exit 2 before Ray starts (1 for a verb that
ran but produced no law or plan), a message naming the file or key, and no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayrl import cli
from rayrl.config import ConfigError, dump_config, load_config
from rayrl.scaling.synthetic import make_metrics
from rayrl.study.resume import check_resume

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "args, key, expected",
    [
        (["--rollout-n", "1"], "grpo.rollout_n", "at least 2"),
        (["--rollout-n", "0"], "grpo.rollout_n", "at least 2"),
        (["--rollout-n", "-3"], "grpo.rollout_n", "at least 2"),
        (["--reuse-factor", "0"], "grpo.reuse_factor", "an integer >= 1"),
        (["--reuse-factor", "3"], "grpo.reuse_factor", "a divisor of grpo.data_budget=64"),
        (["--set", "resources.vllm_dtype=float65"], "resources.vllm_dtype", "one of"),
        (["--set", "grpo.data_budget=4"], "grpo.data_budget", "at least grpo.prompts_per_step"),
        (["--set", "grpo.lr.x=1"], "grpo.lr", "not a mapping of keys"),
        (["--set", "grpo.lr=[1"], "grpo.lr", "not valid YAML"),
    ],
)
def test_bad_train_input_exits_2_before_ray_naming_the_key(started, capsys, args, key, expected):
    code, err = run_cli(capsys, "train", str(SMOKE), "--model", "smoke-1", *args)
    assert code == 2, err
    assert started == []
    assert key in err and expected in err, err


def test_a_model_whose_config_json_is_not_json_is_named(started, capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, err = run_cli(capsys, "train", str(SMOKE), "--model", str(tmp_path))
    assert code == 2 and started == []
    assert str(tmp_path / "config.json") in err and "not valid JSON" in err


def test_flags_set_the_config_they_name(started, capsys):
    code, _ = run_cli(
        capsys, "train", str(SMOKE), "--model", "smoke-1", "--rollout-n", "2", "--seed", "3"
    )
    assert code == 0 and started[0] == "ray" and len(started) == 2
    cfg, trial = started[1]
    assert (trial.rollout_n, trial.seed) == (cfg.grpo.rollout_n, cfg.grpo.seed) == (2, 3)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "metrics.parquet"
    make_metrics(seed=5).to_parquet(path)
    return path


def test_fit_of_one_run_fails_with_its_reason(capsys, metrics, tmp_path):
    import pandas as pd

    df = pd.read_parquet(metrics)
    one = tmp_path / "one.parquet"
    df[df["run_id"] == df["run_id"].iloc[0]].to_parquet(one)
    code, err = run_cli(capsys, "fit", str(one), "--out", str(tmp_path / "f.json"), "--no-figures")
    assert code == 1, err
    assert str(one) in err and "no law could be fitted" in err


@pytest.mark.parametrize("flag, value", [("--n-boot", "-1"), ("--fit-fraction", "1.5")])
def test_fit_refuses_impossible_flags(capsys, metrics, tmp_path, flag, value):
    code, err = run_cli(capsys, "fit", str(metrics), "--out", str(tmp_path / "f.json"), flag, value)
    assert code == 2 and flag in err
    assert not (tmp_path / "f.json").exists()


@pytest.mark.parametrize(
    "doc, expected",
    [
        ([1, 2], "expected a fit document"),
        ({}, "without 'families'"),
        (
            {"families": {"base": {"laws": {"compute": {}}}}},
            "families.base.laws.compute is not a law",
        ),
        ({"families": {"base": {}}}, "families.base has no 'laws'"),
    ],
)
def test_plan_names_the_file_and_what_is_wrong(capsys, tmp_path, doc, expected):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(doc))
    code, err = run_cli(capsys, "plan", str(path), "--compute-budget", "1e15")
    assert code == 2, err
    assert str(path) in err and expected in err


def test_plan_without_an_answer_exits_1(capsys, metrics, tmp_path):
    out = tmp_path / "fit.json"
    assert cli.main(["fit", str(metrics), "--out", str(out), "--no-figures", "--n-boot", "0"]) == 0
    code, err = run_cli(capsys, "plan", str(out))  # no budget, no reuse study
    assert code == 1 and "no plan" in err
    code, err = run_cli(capsys, "plan", str(out), "--compute-budget", "-5")
    assert code == 2 and "--compute-budget" in err
    assert run_cli(capsys, "plan", str(out), "--compute-budget", "1e21")[0] == 0


def test_a_changed_config_refuses_to_resume_naming_the_keys(tmp_path):
    study = tmp_path / "study"
    old = load_config(SMOKE)
    (study / "runs" / old.trials()[0].run_id).mkdir(parents=True)
    dump_config(old, study / "config.yaml")
    same = load_config(SMOKE, {"study.max_concurrent": 2, "study.trackers": []})
    check_resume(same, study)  # scheduling and trackers change no run
    changed = load_config(SMOKE, {"grpo.lr": 5e-4})
    with pytest.raises(ConfigError, match=r"grpo\.lr: 0\.0001 -> 0\.0005.*--restart-changed"):
        check_resume(changed, study)
    # the change is meant: the touched run moves aside (kept) and starts again
    check_resume(changed, study, restart_changed=True)
    assert not (study / "runs" / old.trials()[0].run_id).exists()
    assert list((study / "replaced").glob(f"*/{old.trials()[0].run_id}"))


def test_a_ladder_models_change_touches_only_its_runs(tmp_path):
    study = tmp_path / "study"
    old = load_config(SMOKE)
    smoke2 = [t for t in old.trials() if t.model == "smoke-2"][0]
    (study / "runs" / smoke2.run_id).mkdir(parents=True)
    dump_config(old, study / "config.yaml")
    raw = load_config(SMOKE)
    raw.ladder.models[0].instruct_steps = 7  # smoke-1 (base): no run of it is held
    check_resume(raw, study)


def test_the_cli_refuses_a_changed_study_before_ray(tmp_path):
    study = tmp_path / "study"
    old = load_config(SMOKE)
    (study / "runs" / old.trials()[0].run_id).mkdir(parents=True)
    dump_config(old, study / "config.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "rayrl.cli", "study", str(SMOKE), "--out", str(study)]
        + ["--set", "grpo.clip_high=0.28"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "grpo.clip_high: 0.2 -> 0.28" in out.stderr and "Traceback" not in out.stderr
    assert not (study / "tune").exists()  # no Tune, no Ray


@pytest.mark.parametrize("has_token", [False, True])
def test_a_refused_connection_says_whether_a_token_is_missing(monkeypatch, tmp_path, has_token):
    """Ray refuses a client without the cluster's token with the same ConnectionError as no
    cluster (checked by hand against `ray start --head` with another HOME)."""
    import ray

    from rayrl.study.dryrun import connect

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if has_token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(*a, **k):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError) as e:
        connect()
    assert ("holds no auth token" in str(e.value)) != has_token
    assert "10.0.0.1:6379" in str(e.value)


def test_a_run_that_drew_its_whole_budget_in_fewer_steps_is_finished(tmp_path):
    """Dynamic sampling draws the data budget in fewer steps than data_budget / prompts; a
    resumed study must not schedule such a run again (legacy latest.json layout)."""
    from rayrl.study.resume import remaining_trials

    cfg = load_config(SMOKE, {"study.sweeps": [{"name": "one", "models": ["smoke-1"]}]})
    trials = cfg.trials()
    ckpt = tmp_path / "runs" / trials[0].run_id / "checkpoints"
    ckpt.mkdir(parents=True)
    g = cfg.grpo
    (ckpt / "latest.json").write_text(json.dumps({"step": g.steps - 3, "data": g.data_budget}))
    assert trials[0] not in remaining_trials(cfg, tmp_path)
    (ckpt / "latest.json").write_text(json.dumps({"step": g.steps - 3, "data": g.data_budget - 8}))
    assert trials[0] in remaining_trials(cfg, tmp_path)
