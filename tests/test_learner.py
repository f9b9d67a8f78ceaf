"""The real DeepSpeed learner group on Ray: two gloo ranks with ZeRO-2."""

import pytest
import torch

from rayrl.config import GRPOConfig, ModelSpec, ResourcesConfig
from rayrl.learner.batch import TrainItem, collate
from rayrl.learner.group import LearnerGroup
from rayrl.learner.grpo import token_logprobs
from rayrl.models.qwen import init_model, save_model_dir
from rayrl.models.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    return str(
        save_model_dir(
            init_model(ModelSpec(name="t", hidden=32, layers=2), tok),
            tok,
            tmp_path_factory.mktemp("m"),
        )
    )


def weights(group, rank):
    import ray

    return dict(ray.get(group.actors[rank].named_weights.remote()))


def logprob_of(state, model_dir, item):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(state, strict=False)
    b = collate([item], 0)
    with torch.no_grad():
        logp = token_logprobs(model(input_ids=b.input_ids).logits[:, :-1], b.input_ids[:, 1:])
    return float((logp * b.response_mask).sum())


def test_learner_group_updates_in_step_and_checkpoints(ray_session, model_dir, tmp_path):
    tok = build_tokenizer()
    prompt = tok("Q:1+2=?A:").input_ids
    good, bad = (
        TrainItem(prompt, tok("\\boxed{3}").input_ids + [tok.eos_token_id], 1.0),
        TrainItem(prompt, tok("\\boxed{7}").input_ids + [tok.eos_token_id], -1.0),
    )
    grpo = GRPOConfig(lr=3e-3, prompts_per_step=2, micro_batch=1, kl_coef=0.001)
    group = LearnerGroup(
        model_dir, grpo, ResourcesConfig(learners=2, zero_stage=2, cpus_per_actor=0.5), rollout_n=2
    )
    try:
        assert group.gas == 2  # 4 samples over 2 ranks, micro-batch 1
        before = weights(group, 0)
        for _ in range(3):
            stats = group.train([good, bad, good, bad], temperature=1.0)
        assert stats["tokens_processed"] > 0 and stats["grad_norm"] > 0
        after0, after1 = weights(group, 0), weights(group, 1)
        # data parallel: both ranks hold the same weights after each step
        for name in after0:
            torch.testing.assert_close(after0[name], after1[name])
        # the rewarded answer became more likely, the penalised one less
        assert logprob_of(after0, model_dir, good) > logprob_of(before, model_dir, good)
        assert logprob_of(after0, model_dir, bad) < logprob_of(before, model_dir, bad)

        group.save(str(tmp_path), "step3")
        group.train([good, bad, good, bad], temperature=1.0)
        assert any(not torch.equal(weights(group, 0)[n], after0[n]) for n in after0)
        group.load(str(tmp_path), "step3")
        restored = weights(group, 0)
        for name in after0:
            torch.testing.assert_close(restored[name], after0[name])
    finally:
        group.shutdown()


def test_all_equal_rewards_leave_the_policy_unchanged(ray_session, model_dir):
    tok = build_tokenizer()
    prompt = tok("Q:4+4=?A:").input_ids
    items = [TrainItem(prompt, tok(s).input_ids, 0.0) for s in ("\\boxed{8}", "\\boxed{9}")]
    grpo = GRPOConfig(lr=1e-2, prompts_per_step=1, micro_batch=2, kl_coef=0.0, weight_decay=0.0)
    group = LearnerGroup(
        model_dir, grpo, ResourcesConfig(learners=1, cpus_per_actor=0.5), rollout_n=2
    )
    try:
        before = weights(group, 0)
        stats = group.train(items, temperature=1.0)
        after = weights(group, 0)
        assert stats["grad_norm"] == 0.0
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    finally:
        group.shutdown()
