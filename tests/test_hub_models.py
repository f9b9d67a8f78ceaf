"""Models given as hub ids (issue 35): offline, a cached id resolves to its snapshot in the
Hugging Face cache and an uncached one fails before Ray starts, saying where to put the files.
The cache is a temporary folder in the hub's own layout (models--org--name/snapshots/<rev>/,
refs/main)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

import rayrl.cli as cli
from rayrl.config import ConfigError, ModelSpec, load_config
from rayrl.models.external import check_model_dir, is_hub_id, model_dir
from rayrl.models.qwen import init_model, save_model_dir
from rayrl.models.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
REPO = "rayrl-test/tiny-hub"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small HF model directory (Qwen2, head size 32), as a hub repo would hold it."""
    tok = build_tokenizer()
    spec = ModelSpec("hub", hidden=64, layers=1, heads=2, kv_heads=1)
    return save_model_dir(init_model(spec, tok), tok, tmp_path_factory.mktemp("hub") / "model")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache."""
    path = tmp_path / "hub-cache"
    path.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return path


def place(cache: Path, built: Path) -> Path:
    """Put `built` in `cache` as the hub client leaves a download: the snapshot and refs/main."""
    folder = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    shutil.copytree(built, snapshot)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


def test_hub_ids_are_told_from_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("org/name.v2")
    assert not is_hub_id("tiny-3") and not is_hub_id("/abs/dir") and not is_hub_id("a/b/c")
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_hub_id("org/local")  # a folder here is a path


def test_uncached_id_offline_fails_before_ray_saying_where_to_put_it(cache, started, capsys):
    assert cli.main(["train", str(TINY), "--model", REPO]) == 2
    err = capsys.readouterr().err
    assert started == [] and "Traceback" not in err
    folder = cache / "models--rayrl-test--tiny-hub"
    assert str(TINY) in err and "'--model'" in err and repr(REPO) in err
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in err
    assert f"{folder}/snapshots/<revision>/" in err and f"{folder}/refs/main" in err
    assert f"hf download {REPO}" in err


def test_cached_id_offline_resolves_to_its_snapshot(cache, built, started, capsys):
    snapshot = place(cache, built)
    assert model_dir(REPO) == snapshot
    cfg = load_config(TINY)
    assert check_model_dir(cfg, REPO, "--model") == snapshot  # vLLM's and the context checks
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(model_dir(REPO)).hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(model_dir(REPO))) == len(build_tokenizer())

    assert cli.main(["train", str(TINY), "--model", REPO, "--set", "grpo.data_budget=32"]) == 0
    assert started[0] == "ray"
    cfg, trial = started[-1]
    assert (trial.model, trial.family) == ("tiny-hub", "base")
    assert cfg.model("tiny-hub", "base").path == REPO
    from rayrl.models.ladder import model_path

    assert model_path(cfg, "tiny-hub", "base") == snapshot


def test_listed_hub_id_is_checked_before_a_study_starts(cache, built, started, capsys, tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text(
        TINY.read_text().replace(
            "  models:\n", f"  models:\n    - {{name: hubbed, path: {REPO}, family: base}}\n", 1
        )
    )
    args = ["study", str(listed), "--set", "study.models=[hubbed]", "--set", "study.sweeps=[]"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "'ladder.models[0].path'" in err and "HF_HUB_OFFLINE=1" in err and started == []
    place(cache, built)
    cfg = load_config(listed)  # the id is kept as written, not taken for a relative path
    assert cfg.model("hubbed").path == REPO
    from rayrl.models.external import check_models

    check_models(cfg, [("hubbed", "base")])


def test_a_snapshot_without_weights_is_refused(cache, built, tmp_path):
    snapshot = place(cache, built)
    for f in snapshot.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="lacks them"):
        check_model_dir(load_config(TINY), REPO, "--model")
