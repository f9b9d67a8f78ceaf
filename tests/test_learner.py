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
        # kl_coef 0 and one update: no reference built, and no forward-only pass at all
        assert ray.get(group.actors[0].__ray_call__.remote(lambda a: a.ref is None))
        assert stats["forward_tokens"] == 0 and stats["kl"] == 0.0
        policy = sum(t.numel() * t.element_size() for t in before.values())
        assert group.resident_param_bytes() == [policy]
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
    # pi_old and pi_ref are computed once, each epoch trains on every token again; the first
    # mini-batch takes pi_old from its training forward (before any update), so the reference
    # has a pass over everything and pi_old one over the other mini-batches (equal halves here)
    for (m, epochs), o in out.items():
        tokens = o["tokens_processed"] / epochs
        assert o["forward_tokens"] == tokens * (1 + (m - 1) / m), (m, epochs)
        assert o["logp_diff_mean"] == pytest.approx(0.25, abs=1e-4)
        assert o["logp_diff_max"] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_one_and_two_learners_make_the_same_update(ray_session, model_dir, loss_agg):
    """Global aggregation: neither the rank count (a per-rank token-mean did) nor the cut into
    micro-batches (by count, or sorted under a token budget) changes the update."""
    tok = build_tokenizer()
    # Responses of very different lengths, so each rank's own token-mean differs from the batch's.
    items = answers(
        tok,
        "Q:12+9=?A:",
        ["\\boxed{21}", "21", "\\boxed{2}", "so 12+9 is \\boxed{21}"] * 2,
        [1.0, -0.5, -1.5, 1.0, 0.5, -1.0, -0.5, 1.0],
    )
    # A clip under the gradient's norm: one rank (ZeRO stage 0) clips by its own global norm,
    # two ranks by DeepSpeed ZeRO-2's, and the second update's Adam moments mix both clips.
    grpo = GRPOConfig(
        lr=1e-2,
        prompts_per_step=4,
        mini_batches=2,
        micro_batch=1,
        loss_agg=loss_agg,
        grad_clip=0.05,
    )
    final, stats = {}, {}
    # (ranks, checkpointing, token budget): two ranks; and (once: they are independent of the
    # aggregation) one rank that recomputes activations, the same update with less memory,
    # and one and two ranks whose micro-batches are cut under 45 tokens (the 4 samples of a
    # mini-batch are 13-32 tokens: 3 micro-batches on one rank, 2 and 2 on two)
    others = ((2, False, 0),)
    if loss_agg == "token-mean":
        others += ((1, True, 0), (1, False, 45), (2, False, 45))
    groups = {  # built side by side
        (n, ckpt, budget): LearnerGroup(
            model_dir,
            dataclasses.replace(grpo, micro_batch_tokens=budget),
            ResourcesConfig(
                learners=n, zero_stage=2, cpus_per_actor=0.5, gradient_checkpointing=ckpt
            ),
            rollout_n=2,
        )
        for n, ckpt, budget in ((1, False, 0), *others)
    }
    try:
        for (n, ckpt, budget), group in groups.items():
            on = ray.get(
                group.actors[0].__ray_call__.remote(
                    lambda a: a.engine.module.is_gradient_checkpointing
                )
            )
            assert on == ckpt
            stage = group.actors[0].__ray_call__.remote(
                lambda a: a.engine.zero_optimization_stage()
            )
            assert ray.get(stage) == (0 if n == 1 else 2)  # one rank: no ZeRO (learner_zero_stage)
            stats[n, ckpt, budget] = group.train(items, temperature=1.0)
            final[n, ckpt, budget] = weights(group, 0)
    finally:
        for group in groups.values():
            group.shutdown()
    # padding's share of the training forwards: none at one sample a micro-batch; under the
    # budget, what the sorted cut leaves (one rank: [13, 20] pads 7 of 40, [21] and [33] none)
    assert stats[1, False, 0]["pad_frac"] == 0.0
    if loss_agg == "token-mean":
        lengths = sorted(len(it.prompt_ids) + len(it.response_ids) for it in items[:4])
        assert stats[1, False, 45]["pad_frac"] > 0
        assert stats[1, False, 45]["pad_frac"] < 1 - sum(lengths) / (4 * lengths[-1])
    # the global norm before clipping, as one rank takes it and as ZeRO-2 reports it
    norm = stats[1, False, 0]["grad_norm"]
    assert norm > grpo.grad_clip
    for other in others:
        assert stats[other]["grad_norm"] == pytest.approx(norm, rel=1e-4), other
    before = dict(weights_of_saved(model_dir))
    one = final[1, False, 0]
    moved = max(float((one[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the step did something
    # Within 1e-5 of each tensor's norm: what is left is the order of float sums. The key bias
    # is left out: softmax is shift-invariant, so its true gradient is 0 and Adam turns the
    # rounding noise into full-size steps.
    # A cut that pads a sample differently changes the matmuls' blocking too: 5e-5 there
    # (measured 1.2e-5; a per-micro-batch denominator would be off by tens of percent).
    for other in others:
        for name in (n for n in one if not n.endswith("k_proj.bias")):
            diff = float((final[other][name] - one[name]).norm() / one[name].norm())
            assert diff < (5e-5 if other[2] else 1e-5), (other, name, diff)


def weights_of_saved(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()


def test_deepspeed_config_carries_the_learner_knobs():
    grpo = GRPOConfig(micro_batch=3, grad_clip=0.5, prompts_per_step=8, mini_batches=2)
    ds = deepspeed_config(grpo, ResourcesConfig(learners=2, zero_stage=1), gas=2, world_size=2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == 3 * 2 * 2 and not ds["bf16"]["enabled"]
    # one rank: ZeRO-1/2 shard nothing, so stage 0, and the learner clips (DeepSpeed's fp32
    # stage 0 keeps no norm); ZeRO-3 as configured; on GPU DeepSpeed's bf16 optimizer clips
    one = deepspeed_config(grpo, ResourcesConfig(zero_stage=2), 1, 1)
    assert one["zero_optimization"]["stage"] == 0 and one["gradient_clipping"] == 0.0
    assert deepspeed_config(grpo, ResourcesConfig(zero_stage=3), 1, 1)["zero_optimization"] == {
        "stage": 3
    }
    gpu = deepspeed_config(grpo, ResourcesConfig(device="gpu"), 1, 1)
    assert gpu["bf16"]["enabled"] and gpu["gradient_clipping"] == 0.5
    # micro-batches per optimizer step: a mini-batch of 4 prompts x 4 samples over 2 ranks
    assert grad_accumulation_steps(grpo, rollout_n=4, world_size=2) == 3  # ceil(8 / 3)
    assert grad_accumulation_steps(dataclasses.replace(grpo, mini_batches=1), 4, 2) == 6


# --- the step's statistics, declared once -------------------------------------------------


def test_statistics_merge_by_their_declared_rule():
    from rayrl.learner.stats import LOGGED, SKIPPED, finish, merge

    parts = [
        {"tokens": 3.0, "pg_loss": 1.5, "ratio_max": 1.5, "grad_norm": 0.5},
        {"tokens": 1.0, "pg_loss": 0.5, "ratio_max": 1.2, "loss": 0.25, "grad_norm": 0.5},
        {"loss": 0.5, "logp_diff_mean": 0.3, "logp_diff_tokens": 3.0, "logp_diff_max": 0.2},
    ]
    out = finish(merge(parts))
    assert out["tokens"] == 4.0 and out["loss"] == 0.75  # sums
    assert out["ratio_max"] == 1.5 and out["grad_norm"] == 0.5  # maxima
    assert out["pg_loss"] == pytest.approx(2.0 / 4.0)  # token sums over the token count
    assert out["logp_diff_mean"] == pytest.approx(0.1)  # over its own count
    # merging ranks' merged parts gives what merging every part at once gives
    assert finish(merge([merge(parts[:2]), merge(parts[2:])])) == out
    with pytest.raises(KeyError, match="not declared"):
        merge([{"tokens": 1.0, "undeclared": 2.0}])
    # a skipped update logs every statistic, as zeros
    assert set(LOGGED) <= set(SKIPPED) and not any(SKIPPED.values())


def test_every_statistic_of_the_loss_is_declared():
    from rayrl.learner.grpo import grpo_loss
    from rayrl.learner.stats import BY_NAME

    logp = torch.zeros(2, 3)
    _, stats = grpo_loss(
        logp, logp, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 3), GRPOConfig(), 6.0, logp
    )
    assert set(stats) <= set(BY_NAME), set(stats) - set(BY_NAME)


# --- pi_old from the training forward, no reference at kl_coef 0 --------------------------


def test_pi_old_has_a_forward_of_its_own_only_after_the_first_update():
    from rayrl.learner.actor import old_forward_mini_batches as own

    one = GRPOConfig(mini_batches=1, ppo_epochs=1)
    assert list(own(one)) == []  # one update: pi_old is the training forward
    # the paper's 4 updates: the first mini-batch trains before any update, the rest after
    assert list(own(dataclasses.replace(one, mini_batches=4))) == [1, 2, 3]
    # epochs and staleness change nothing: pi_old is the learner's weights at the step's start
    assert list(own(dataclasses.replace(one, mini_batches=2, ppo_epochs=2, async_steps=1))) == [1]


def test_pi_old_from_the_training_forward_makes_the_same_update(ray_session, model_dir):
    tok = build_tokenizer()
    items = answers(
        tok, "Q:1+2=?A:", ["\\boxed{3}", "\\boxed{7}", "3", "\\boxed{33}"], [1, -1, 0.5, -0.5]
    )
    # fp32 rollout log-probs 0.1 off (bf16-like), so the IS weights are on and differ from 1
    for it in items:
        it.rollout_logprobs = (token_logprobs_of(None, model_dir, it) + 0.1).tolist()
    # two mini-batches, two epochs: the first mini-batch's pi_old from its epoch-0 training
    # forward, kept for epoch 1; the second's from a forward of its own
    # micro_batch 4 over mini-batches of 2: the forward-only passes take both at once
    grpo = GRPOConfig(
        lr=1e-2, prompts_per_step=2, mini_batches=2, ppo_epochs=2, micro_batch=4, kl_coef=0.01
    )
    resources = ResourcesConfig(learners=1, cpus_per_actor=0.5, vllm_dtype="bfloat16")
    groups = [LearnerGroup(model_dir, grpo, resources, rollout_n=2) for _ in range(2)]
    try:
        # the second group made to take the separate pi_old forward for both mini-batches
        ray.get(
            groups[1].actors[0].__ray_call__.remote(lambda a: setattr(a, "old_forwards", range(2)))
        )
        stats = [g.train(items, temperature=1.0) for g in groups]
        final = [weights(g, 0) for g in groups]
    finally:
        for g in groups:
            g.shutdown()
    fused, separate = stats
    # pi_ref over every token; pi_old over both mini-batches, or over the second only
    tokens = separate["tokens_processed"] / 2  # two epochs
    assert separate["forward_tokens"] == 2 * tokens > fused["forward_tokens"] > tokens
    stats_ = ("loss", "pg_loss", "kl", "ratio_mean", "ratio_max", "clip_frac", "is_weight_mean")
    for k in (*stats_, "logp_diff_mean", "grad_norm"):
        assert fused[k] == pytest.approx(separate[k], rel=1e-5, abs=1e-7), k
    assert fused["ratio_max"] > 1.0 and fused["is_weight_mean"] != 1.0
    for name in (n for n in final[0] if not n.endswith("k_proj.bias")):  # see below
        diff = float((final[0][name] - final[1][name]).norm() / final[1][name].norm())
        assert diff < 1e-5, (name, diff)


@pytest.mark.parametrize("budget", [0, 60])
def test_forward_only_passes_join_micro_batches_to_the_same_log_probs(model_dir, budget):
    from transformers import AutoModelForCausalLM

    from rayrl.learner.actor import Learner

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lengths = [(3, 0), (9, 12), (4, 5), (8, 1), (5, 7), (6, 2), (3, 11), (7, 4), (9, 9)]
    items = [TrainItem([5] * p, [7] * r, 0.0) for p, r in lengths]
    micro = [items[0:2], items[2:3], items[3:6], items[6:7], items[7:9]]
    grpo = GRPOConfig(micro_batch=4, micro_batch_tokens=budget)
    learner = Learner(0, 1, grpo, ResourcesConfig())
    learner.pad_id = 0
    joined = []
    learner._logprobs = lambda m, b, t: (
        joined.append(len(b.input_ids)) or Learner._logprobs(learner, m, b, t)
    )
    with torch.no_grad():
        got = learner._forward_only(model, micro, 0.7)
        alone = [Learner._logprobs(learner, model, collate(mb, 0), 0.7) for mb in micro]
    assert len(joined) < len(micro) and sum(joined) == len(items)  # fewer, larger forwards
    if budget == 0:
        assert max(joined) <= 4
    for a, b in zip(got, alone, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_reference_model_in_the_memory_estimate_at_kl_coef_0():
    from rayrl.models.memory import PAPER_MODELS, learner_gib

    arch, r = PAPER_MODELS["Qwen2.5-7B"], ResourcesConfig(device="gpu", learners=8, zero_stage=3)
    with_kl = learner_gib(arch, r, GRPOConfig(kl_coef=0.001), checkpointing=True)
    without = learner_gib(arch, r, GRPOConfig(kl_coef=0.0), checkpointing=True)
    assert with_kl["reference"] > 0 and "reference" not in without
    assert sum(with_kl.values()) - sum(without.values()) == pytest.approx(with_kl["reference"])


# --- micro-batches by token budget ---------------------------------------------------------


def test_token_budget_cuts_sorted_micro_batches_as_many_on_every_rank():
    from rayrl.learner.batch import length, micro_batches, split_even

    lengths = [5, 40, 7, 12, 33, 6, 8, 50, 9, 11, 30, 4]
    items = [TrainItem([1] * 3, [2] * (n - 3), 0.0) for n in lengths]
    for ranks in (1, 2, 3):
        shards = split_even(items, ranks)
        cut = micro_batches(shards, gas=1, budget=48)
        assert len({len(c) for c in cut}) == 1  # the ranks' backwards pair up
        for shard, c in zip(shards, cut):
            assert sorted(map(id, shard)) == sorted(id(it) for mb in c for it in mb)
            for mb in (mb for mb in c if len(mb) > 1):
                assert len(mb) * max(map(length, mb)) <= 48
    # sorting packs the short ones together: far less padding than rollout order
    one = micro_batches([items], gas=1, budget=48)[0]
    padded = sum(len(mb) * max(map(length, mb)) for mb in one)
    by_count = sum(len(mb) * max(map(length, mb)) for mb in split_even(items, len(one)))
    assert sum(lengths) <= padded < by_count
    # a rank with fewer items than the others' micro-batches pads with empty ones
    assert micro_batches([items[:1], items[1:3]], gas=1, budget=1)[0] == [items[:1][0:1], []]
    # budget 0: today's gas near-equal micro-batches in rollout order
    assert micro_batches([items], gas=4, budget=0) == [split_even(items, 4)]


# --- the bf16 learner -----------------------------------------------------------------------


def test_bf16_learner_computes_in_bf16_over_fp32_weights(ray_session, model_dir):
    tok = build_tokenizer()
    items = answers(tok, "Q:1+2=?A:", ["\\boxed{3}", "\\boxed{7}"], [1.0, -1.0])
    for it in items:  # the fp32 model's own log-probs, as an fp32 rollout samples them
        it.rollout_logprobs = token_logprobs_of(None, model_dir, it).tolist()
    grpo = GRPOConfig(lr=1e-2, prompts_per_step=1, mini_batches=1, micro_batch=2)
    r = ResourcesConfig(learners=1, cpus_per_actor=0.5, learner_dtype="bfloat16")
    assert r.learner_bf16 and not ResourcesConfig().learner_bf16
    assert ResourcesConfig(device="gpu").learner_bf16  # auto: bf16 on GPU, as before
    assert not deepspeed_config(grpo, r, 1, 1)["bf16"]["enabled"]  # autocast on CPU
    group = LearnerGroup(model_dir, grpo, r, rollout_n=2)
    try:
        before = weights(group, 0)
        stats = [group.train(items, temperature=1.0) for _ in range(2)]
        after = weights(group, 0)
    finally:
        group.shutdown()
    # fp32 master weights; bf16 matmuls move the log-probs off the fp32 ones, but little
    assert all(t.dtype == torch.float32 for t in after.values())
    assert 1e-4 < stats[0]["logp_diff_mean"] < 0.05
    good, bad = items
    assert logprob_of(after, model_dir, good) > logprob_of(before, model_dir, good)
    assert logprob_of(after, model_dir, bad) < logprob_of(before, model_dir, bad)
