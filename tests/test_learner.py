"""The real DeepSpeed learner group on Ray: two gloo ranks with ZeRO-2."""

import dataclasses

import pytest
import ray
import torch

from rayrl.config import GRPOConfig, ModelSpec, ResourcesConfig
from rayrl.learner.actor import deepspeed_config, grad_accumulation_steps
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


def token_logprobs_of(state, model_dir, item):
    """The response tokens' log-probs under `state` (None: the saved model), by plain HF."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if state is not None:
        model.load_state_dict(state, strict=False)
    b = collate([item], 0)
    with torch.no_grad():
        logp = token_logprobs(model(input_ids=b.input_ids).logits[:, :-1], b.input_ids[:, 1:])
    return logp[b.response_mask > 0]


def logprob_of(state, model_dir, item):
    return float(token_logprobs_of(state, model_dir, item).sum())


def test_learner_group_updates_in_step_and_checkpoints(ray_session, model_dir, tmp_path):
    tok = build_tokenizer()
    prompt = tok("Q:1+2=?A:").input_ids
    good, bad = (
        TrainItem(prompt, tok("\\boxed{3}").input_ids + [tok.eos_token_id], 1.0),
        TrainItem(prompt, tok("\\boxed{7}").input_ids + [tok.eos_token_id], -1.0),
    )
    grpo = GRPOConfig(lr=3e-3, prompts_per_step=2, mini_batches=1, micro_batch=1, kl_coef=0.001)
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


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_all_equal_rewards_leave_the_policy_unchanged(ray_session, model_dir, weight_decay):
    tok = build_tokenizer()
    prompt = tok("Q:4+4=?A:").input_ids
    items = [TrainItem(prompt, tok(s).input_ids, 0.0) for s in ("\\boxed{8}", "\\boxed{9}")]
    grpo = GRPOConfig(
        lr=1e-2,
        prompts_per_step=1,
        mini_batches=1,
        micro_batch=2,
        kl_coef=0.0,
        weight_decay=weight_decay,
    )
    group = LearnerGroup(
        model_dir, grpo, ResourcesConfig(learners=1, cpus_per_actor=0.5), rollout_n=2
    )
    try:
        before = weights(group, 0)
        stats = group.train(items, temperature=1.0)
        after = weights(group, 0)
        assert stats["grad_norm"] == 0.0
        if weight_decay == 0.0:
            for name in before:
                torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
        else:  # decoupled decay shrinks every weight by lr * weight_decay, gradient or not
            w = "model.layers.0.mlp.up_proj.weight"
            torch.testing.assert_close(after[w], before[w] * (1 - 1e-2 * weight_decay))
    finally:
        group.shutdown()


def answers(tok, prompt_text, responses, advantages):
    prompt = tok(prompt_text).input_ids
    return [
        TrainItem(prompt, tok(r).input_ids + [tok.eos_token_id], a)
        for r, a in zip(responses, advantages)
    ]


def test_mini_batches_make_pi_old_stale_and_the_clip_engage(ray_session, model_dir):
    tok = build_tokenizer()
    items = answers(tok, "Q:1+2=?A:", ["\\boxed{3}", "\\boxed{7}"] * 2, [1.0, -1.0] * 2)
    # The behaviour policy's log-probs, 0.25 off the learner's own: the logged mismatch.
    for it in items:
        it.rollout_logprobs = (token_logprobs_of(None, model_dir, it) + 0.25).tolist()
    # The three groups build their engines side by side.
    groups = {
        (m, epochs): LearnerGroup(
            model_dir,
            GRPOConfig(
                lr=5e-2, prompts_per_step=2, mini_batches=m, ppo_epochs=epochs, micro_batch=4
            ),
            ResourcesConfig(learners=1, cpus_per_actor=0.5),
            rollout_n=2,
        )
        for m, epochs in ((1, 1), (2, 1), (1, 2))
    }
    try:
        out = {key: group.train(items, temperature=1.0) for key, group in groups.items()}
    finally:
        for group in groups.values():
            group.shutdown()
    # one update: pi = pi_old throughout, so the ratio is 1 and nothing is clipped
    assert out[1, 1]["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert out[1, 1]["clip_frac"] == 0.0
    # a second update (the next mini-batch, or the next epoch over the same one) starts from a
    # policy that has moved away from pi_old, far enough to clip
    for later in ((2, 1), (1, 2)):
        assert out[later]["ratio_max"] > 1.2 or out[later]["ratio_mean"] < 0.9, later
        assert out[later]["clip_frac"] > 0.0, later
    # pi_old and pi_ref are computed once; each epoch trains on every token again
    for (_, epochs), o in out.items():
        assert o["tokens_processed"] == epochs * o["forward_tokens"]
        assert o["logp_diff_mean"] == pytest.approx(0.25, abs=1e-4)
        assert o["logp_diff_max"] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_one_and_two_learners_make_the_same_update(ray_session, model_dir, loss_agg):
    """Global aggregation: the rank count does not change the update (a per-rank token-mean did)."""
    tok = build_tokenizer()
    # Responses of very different lengths, so each rank's own token-mean differs from the batch's.
    items = answers(
        tok,
        "Q:12+9=?A:",
        ["\\boxed{21}", "21", "\\boxed{2}", "so 12+9 is \\boxed{21}"] * 2,
        [1.0, -0.5, -1.5, 1.0, 0.5, -1.0, -0.5, 1.0],
    )
    grpo = GRPOConfig(lr=1e-2, prompts_per_step=4, mini_batches=2, micro_batch=1, loss_agg=loss_agg)
    final = {}
    # two ranks; and (once: it is independent of the aggregation) one rank that recomputes
    # activations, the same update with less memory
    others = ((2, False), (1, True)) if loss_agg == "token-mean" else ((2, False),)
    groups = {  # built side by side
        (n, ckpt): LearnerGroup(
            model_dir,
            grpo,
            ResourcesConfig(
                learners=n, zero_stage=2, cpus_per_actor=0.5, gradient_checkpointing=ckpt
            ),
            rollout_n=2,
        )
        for n, ckpt in ((1, False), *others)
    }
    try:
        for (n, ckpt), group in groups.items():
            on = ray.get(
                group.actors[0].__ray_call__.remote(
                    lambda a: a.engine.module.is_gradient_checkpointing
                )
            )
            assert on == ckpt
            group.train(items, temperature=1.0)
            final[n, ckpt] = weights(group, 0)
    finally:
        for group in groups.values():
            group.shutdown()
    before = dict(weights_of_saved(model_dir))
    one = final[1, False]
    moved = max(float((one[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the step did something
    # Within 1e-5 of each tensor's norm: what is left is the order of float sums. The key bias
    # is left out: softmax is shift-invariant, so its true gradient is 0 and Adam turns the
    # rounding noise into full-size steps.
    for other in others:
        for name in (n for n in one if not n.endswith("k_proj.bias")):
            diff = float((final[other][name] - one[name]).norm() / one[name].norm())
            assert diff < 1e-5, (other, name, diff)


def weights_of_saved(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()


def test_deepspeed_config_carries_the_learner_knobs():
    grpo = GRPOConfig(micro_batch=3, grad_clip=0.5, prompts_per_step=8, mini_batches=2)
    ds = deepspeed_config(grpo, ResourcesConfig(zero_stage=1), gas=2, world_size=2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == 3 * 2 * 2 and not ds["bf16"]["enabled"]
    assert deepspeed_config(grpo, ResourcesConfig(device="gpu"), 1, 1)["bf16"]["enabled"]
    # micro-batches per optimizer step: a mini-batch of 4 prompts x 4 samples over 2 ranks
    assert grad_accumulation_steps(grpo, rollout_n=4, world_size=2) == 3  # ceil(8 / 3)
    assert grad_accumulation_steps(dataclasses.replace(grpo, mini_batches=1), 4, 2) == 6
