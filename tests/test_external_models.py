"""Models given by path: how `--model DIR` and `ladder.models[].path` resolve, and the errors
that come before any actor starts, each naming the file, the key and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rayrl.cli as cli
from rayrl.config import ConfigError, ModelSpec, load_config
from rayrl.models.external import add_model, check_model_dir, check_models
from rayrl.models.qwen import init_model, save_model_dir
from rayrl.models.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small HF model directory (Qwen2, context 512, head size 32)."""
    tok = build_tokenizer()
    spec = ModelSpec("ext", hidden=64, layers=1, heads=2, kv_heads=1)
    return save_model_dir(init_model(spec, tok), tok, tmp_path_factory.mktemp("ext") / "ext-model")


def train_cli(capsys, started: list, *args: str) -> str:
    """The CLI's error for `rayrl train tiny.yaml ARGS`, which must come before Ray starts."""
    code = cli.main(["train", str(TINY), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert started == []
    return err


def test_a_path_that_is_not_a_model_directory(started, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("no config.json here")
    err = train_cli(capsys, started, "--model", str(tmp_path))
    assert str(TINY) in err and "'--model'" in err and "expected an HF model directory" in err
    assert str(tmp_path) in err


def test_a_name_that_is_neither_listed_nor_a_path(started, capsys):
    err = train_cli(capsys, started, "--model", "tiny-9")
    assert str(TINY) in err and "'--model'" in err and "ladder.models name" in err
    assert "tiny-1" in err  # the known names


def test_an_architecture_vllm_cannot_serve(started, capsys, model_dir, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in model_dir.iterdir():
        (odd / f.name).symlink_to(f)
    (odd / "config.json").unlink()
    hf = json.loads((model_dir / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**hf, "architectures": ["NoSuchForCausalLM"]}))
    err = train_cli(capsys, started, "--model", str(odd))
    assert f"{odd}/config.json" in err and "'architectures'" in err
    assert "vLLM can serve" in err and "NoSuchForCausalLM" in err


def test_prompt_and_answer_beyond_the_models_context(started, capsys, model_dir):
    err = train_cli(capsys, started, "--model", str(model_dir), "--set", "grpo.max_new_tokens=600")
    assert str(TINY) in err and "'grpo.max_prompt_tokens' + 'grpo.max_new_tokens'" in err
    assert "32 + 600 = 632" in err and "max_position_embeddings = 512" in err
    assert f"{model_dir}/config.json" in err


def test_a_listed_path_is_checked_before_a_study_starts(started, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("rayrl.study.run_study", lambda *a, **k: pytest.fail("study started"))
    code = cli.main(
        ["study", str(TINY), "--set", f"ladder.models=[{{name: m, path: {tmp_path}}}]"]
        + ["--set", "study.models=[m]", "--set", "study.sweeps=[]"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'ladder.models[0].path'" in err and "HF model directory" in err
    assert started == []


def test_a_run_checks_its_model_before_any_actor(model_dir, tmp_path, monkeypatch):
    """Run (the library path: studies' trials, tools) checks too, before its first pool."""
    from rayrl.trainer import Run
    from rayrl.trial import Trial

    def no_pool(*args, **kwargs):
        pytest.fail("an actor pool was started")

    for name in ("RolloutPool", "LearnerGroup", "RewardPool"):
        monkeypatch.setattr(f"rayrl.pools.{name}", no_pool)
    cfg = load_config(TINY, {"grpo.max_new_tokens": 600})
    name = add_model(cfg, str(model_dir), "instruct")
    with pytest.raises(ConfigError, match="max_position_embeddings = 512"):
        Run(cfg, Trial(name, "instruct", 8, 1, 0), tmp_path / "run")


def test_model_directory_and_listed_instruct_model_resolve(started, capsys, model_dir, tmp_path):
    cli.main(["train", str(TINY), "--model", str(model_dir), "--set", "grpo.data_budget=32"])
    assert started[0] == "ray"
    cfg, spec = started[-1]
    assert (spec.model, spec.family) == ("ext-model", "base")
    assert cfg.model("ext-model", "base").path == str(model_dir)
    assert cfg.grpo.data_budget == 32
    assert spec.run_id.startswith("ext-model-base-")

    listed = tmp_path / "listed.yaml"
    listed.write_text(
        TINY.read_text().replace(
            "  models:\n",
            f"  models:\n    - {{name: chat, path: {model_dir}, family: instruct}}\n",
            1,
        )
    )
    cli.main(["train", str(listed), "--model", "chat"])
    cfg, spec = started[-1]
    assert (spec.model, spec.family) == ("chat", "instruct")
    # The same name in another family is not that model.
    started.clear()
    err = train_cli(capsys, started, "--model", "tiny-1", "--family", "instruct")
    assert "no model named 'tiny-1' in family 'instruct'" in err


def test_checks_pass_for_a_good_directory_and_skip_ladder_models(model_dir):
    cfg = load_config(TINY)
    assert check_model_dir(cfg, str(model_dir), "--model") == model_dir
    check_models(cfg, [("tiny-1", "base")])  # built by rayrl: nothing to check, nothing built
    with pytest.raises(ConfigError, match="already a ladder.models entry"):
        add_model(cfg, str(model_dir.parent / "tiny-1"), "base")
