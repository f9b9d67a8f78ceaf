"""Parameter counting, FLOPs, the character tokenizer, pre-training pieces and the ladder cache."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrl.config import Config, ConfigError, DataConfig, LadderConfig, ModelSpec, load_config
from rayrl.data.synthetic import held_out
from rayrl.models.build import non_embedding_params, pretrain_lr
from rayrl.models.flops import count_params, forward_flops, train_flops
from rayrl.models.ladder import (
    build_ladder,
    cache_key,
    format_table,
    mean_sequence_tokens,
    model_path,
    pretrain_steps,
)
from rayrl.models.pretrain import corpus_batch, lr_at
from rayrl.models.qwen import init_model, qwen2_config
from rayrl.models.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(build_tokenizer())


def expected_non_embedding(h: int, layers: int, heads: int, kv_heads: int) -> int:
    """Qwen2 by hand: q/k/v with bias, o without, SwiGLU MLP of 4h, two RMSNorms a layer."""
    kv = h // heads * kv_heads
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    mlp = 3 * h * 4 * h
    return layers * (attention + mlp + 2 * h) + h  # + final norm


@pytest.mark.parametrize(
    "h, layers, heads, kv_heads", [(32, 1, 1, 1), (64, 2, 2, 1), (96, 3, 3, 3)]
)
@pytest.mark.parametrize("tied", [False, True])
def test_count_params(h: int, layers: int, heads: int, kv_heads: int, tied: bool):
    spec = ModelSpec("m", h, layers, heads=heads, kv_heads=kv_heads, tie_embeddings=tied)
    total, non_embedding = count_params(init_model(spec, build_tokenizer()))
    assert non_embedding == expected_non_embedding(h, layers, heads, kv_heads)
    assert total == non_embedding + VOCAB * h * (1 if tied else 2)


def test_flops_are_six_and_two_n_t():
    # C = 6 * N * T for a training step, 2 * N * T for a forward pass (paper eq. 10-11)
    assert train_flops(1_000_000, 2_048) == 6 * 1_000_000 * 2_048
    assert forward_flops(500, 10) == 10_000
    assert train_flops(0, 10) == 0


def test_tokenizer_round_trip(tmp_path: Path):
    tok = build_tokenizer()
    text = "Q:12+345=?A:\\boxed{357}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.unk_token_id in tok("é", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_corpus_batch_trains_on_completions_only_and_skips_held_out():
    tok = build_tokenizer()
    exclude = set(held_out(100, 2, seed=0))  # half of all 1-digit problems, 50 2-digit ones
    ids, mask, labels = corpus_batch(
        random.Random(0), tok, 512, 2, exclude, hardest_share=0.25, unboxed_share=0.4
    )
    two_digit = bare = 0
    for row_ids, row_mask, row_labels in zip(ids, mask, labels):
        text = tok.decode(row_ids[row_mask.bool()])
        a, b = map(int, text[2 : text.index("=")].split("+"))
        assert (a, b) not in exclude
        two_digit += max(a, b) >= 10
        completion = tok.decode(row_labels[row_labels != -100])
        assert completion in (f"\\boxed{{{a + b}}}{tok.eos_token}", f"{a + b}{tok.eos_token}")
        bare += not completion.startswith("\\boxed")
    assert 0.15 < two_digit / 512 < 0.35  # the hardest level's share of the corpus
    assert 0.3 < bare / 512 < 0.5  # answers written without \\boxed{}: the habit RL unlearns


def test_learning_rate_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def tiny_config(cache: Path) -> Config:
    models = [
        ModelSpec("t-untied", 32, 1, heads=1, kv_heads=1),
        ModelSpec("t-tied", 64, 1, heads=2, kv_heads=1, tie_embeddings=True),
    ]
    ladder = LadderConfig(
        models=models,
        pretrain_tokens_per_param=0,
        pretrain_min_steps=5,
        eval_problems=8,
        eval_samples=2,
        dir=str(cache),
    )
    return Config(ladder=ladder, data=DataConfig(test_size=20, max_digits=2))


def test_ladder_build_saves_hf_dirs_and_caches(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RAYRL_CACHE", raising=False)
    cfg = tiny_config(tmp_path / "ladder")
    entries = build_ladder(cfg, progress=False)
    assert [e.name for e in entries] == ["t-untied", "t-tied"]
    for e, tied in zip(entries, [False, True]):
        path = Path(e.path)
        assert path.parent == tmp_path / "ladder"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in path.iterdir()
        }
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert model.config.tie_word_embeddings is tied
        assert count_params(model) == (e.total_params, e.non_embedding_params)
        assert 0.0 <= e.pass_at_1 <= 1.0 and e.pretrain_steps == 5
    manifest = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    assert manifest["t-tied"]["non_embedding_params"] == entries[1].non_embedding_params

    start = time.perf_counter()
    assert build_ladder(cfg, progress=False) == entries  # cache hit
    assert time.perf_counter() - start < 1.0
    assert model_path(cfg, "t-tied") == Path(entries[1].path)

    cfg.ladder.pretrain_min_steps = 6  # a different recipe is a different model
    rebuilt = build_ladder(cfg, ["t-untied"], progress=False)
    assert rebuilt[0].path != entries[0].path and rebuilt[0].pretrain_steps == 6

    table = format_table(entries)
    assert table.splitlines()[0].split() == [
        "model",
        "total",
        "params",
        "non-embedding",
        "params",
        "held-out",
        "pass@1",
    ]
    assert f"{entries[1].total_params:,}" in table and "t-untied" in table


def test_cache_env_override_and_unknown_model(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RAYRL_CACHE", str(tmp_path / "env"))
    cfg = tiny_config(tmp_path / "config-dir")
    (entry,) = build_ladder(cfg, ["t-untied"], progress=False)
    assert Path(entry.path).parent == tmp_path / "env" / "ladder"
    with pytest.raises(ConfigError, match="no model named 'nope'"):
        model_path(cfg, "nope")


def test_pretraining_budget_is_tokens_per_parameter_with_a_floor():
    cfg = tiny_config(Path("unused"))
    cfg.ladder.pretrain_tokens_per_param = 100.0
    cfg.ladder.pretrain_min_steps = 10
    per_step = cfg.ladder.pretrain_batch * mean_sequence_tokens(cfg.data.max_digits, 0.2)
    assert 10 < per_step < 64 * 30  # "Q:ab+cd=?A:\boxed{efg}" plus EOS, 64 to a batch
    assert pretrain_steps(cfg, 1_000_000) == math.ceil(100 * 1_000_000 / per_step)
    assert pretrain_steps(cfg, 2_000_000) >= 2 * pretrain_steps(cfg, 1_000_000) - 1
    assert pretrain_steps(cfg, 10) == 10


@pytest.mark.e2e
def test_smoke_ladder_starts_with_signal_and_headroom(monkeypatch):
    """configs/smoke.yaml's ladder (what CI's GRPO runs start from): pass@1 above 0.02 and
    below 0.95, so that GRPO groups are neither all wrong nor all right."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    entries = build_ladder(cfg, progress=False)
    assert len(entries) == len(cfg.ladder.models) == 4  # 2 sizes x base and instruct
    for e in entries:
        assert 0.02 < e.pass_at_1 < 0.95, e


def test_width_depth_and_pretraining_knobs_reach_the_model_and_its_budget():
    tok = build_tokenizer()
    spec = ModelSpec(name="m", hidden=64, layers=2, heads=2, kv_heads=1)
    assert qwen2_config(spec, tok).intermediate_size == 4 * 64  # 0 means 4 x hidden
    spec.intermediate = 96
    assert qwen2_config(spec, tok).intermediate_size == 96
    cfg = tiny_config(Path("unused"))
    cfg.ladder.pretrain_lr, cfg.ladder.pretrain_lr_width = 3e-3, 32
    assert pretrain_lr(cfg, spec) == pytest.approx(3e-3 * 32 / 64)  # 1/width (muP)
    cfg.ladder.pretrain_lr_width = 64
    assert pretrain_lr(cfg, spec) == pytest.approx(3e-3)
    # more of the corpus at the hardest level: longer sequences, fewer steps for the same tokens
    cfg.ladder.pretrain_tokens_per_param, cfg.ladder.pretrain_min_steps = 100.0, 1
    steps = {}
    for share in (0.0, 1.0):
        cfg.ladder.pretrain_hardest_share = share
        steps[share] = pretrain_steps(cfg, 1_000_000)
    assert steps[1.0] < steps[0.0]


def test_instruct_steps_make_a_separate_ladder_build():
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    base, instruct = (m for m in cfg.ladder.models if m.name == "smoke-1")
    assert (base.family, instruct.family) == ("base", "instruct") and instruct.instruct_steps
    assert cache_key(cfg, base) != cache_key(cfg, instruct)
    assert cache_key(cfg, dataclasses.replace(instruct, instruct_steps=0, family="base")) == (
        cache_key(cfg, base)
    )


def test_the_default_ladder_is_one_family_spanning_a_decade_and_a_half():
    """configs/tiny.yaml (issue 34): every member follows one shape rule, so k(N) has only N
    to go on, and non-embedding N spans at least 10^1.5, growing with each member."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    models = cfg.ladder.models
    for m in models:
        shape = (m.layers, m.heads * 32, m.kv_heads, m.intermediate)
        assert shape == (1, m.hidden, 1, 2 * m.hidden), m  # heads of 32, MLP 2x width
    n = [non_embedding_params(m) for m in models]
    assert n == sorted(n) and len(set(n)) == len(n)
    assert math.log10(n[-1] / n[0]) >= 1.5, n
