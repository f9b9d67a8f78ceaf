"""GRPO loss against hand-computed values."""

import math

import pytest
import torch

from rayrl.config import GRPOConfig
from rayrl.learner.grpo import (
    group_advantages,
    grpo_loss,
    loss_denominator,
    token_logprobs,
)

NO_KL = GRPOConfig(kl_coef=0.0)


def test_group_normalised_advantages():
    adv, flat = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), n=3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3) -> (1 - 1/3)/0.57735 = 1.1547, (0 - 1/3)/0.57735 = -0.57735
    assert adv[:3].tolist() == pytest.approx([1.1547005, -0.5773503, -0.5773503], abs=1e-6)
    # group 2: mean 2/3 -> -1.1547, 0.57735, 0.57735
    assert adv[3:].tolist() == pytest.approx([-1.1547005, 0.5773503, 0.5773503], abs=1e-6)
    assert flat == 0


def test_adv_eps_damps_groups_of_small_spread():
    r = torch.tensor([1.0, 0.0])  # unbiased std sqrt(1/2)
    adv, _ = group_advantages(r, n=2, eps=0.0)
    damped, _ = group_advantages(r, n=2, eps=1.0)
    assert adv[0].item() == pytest.approx(0.5 / math.sqrt(0.5))
    assert damped[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1.0))


def test_all_equal_groups_are_counted_and_have_zero_advantage():
    adv, flat = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), n=2)
    assert flat == 2
    assert adv[:4].abs().max() == 0.0
    assert adv[4] > 0 > adv[5]


def _loss(ratio, adv, **kw):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    g = GRPOConfig(kl_coef=0.0, **kw)
    loss, stats = grpo_loss(logp, old, logp.detach(), torch.tensor([adv]), torch.ones(1, 1), g, 1)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, adv, value, grad_zero",
    [
        (1.5, 1.0, -1.2, True),  # positive advantage, ratio above 1+eps_high: clipped, no gradient
        (0.5, 1.0, -0.5, False),  # positive advantage, low ratio: unclipped (pessimistic min)
        (0.5, -1.0, 0.8, True),  # negative advantage, ratio below 1-eps_low: clipped
        (1.5, -1.0, 1.5, False),  # negative advantage, high ratio: unclipped, under the dual cap
        (1.1, 1.0, -1.1, False),  # inside the trust region
    ],
)
def test_clipping_on_both_sides(ratio, adv, value, grad_zero):
    loss, grad, stats = _loss(ratio, adv)
    assert loss == pytest.approx(value, abs=1e-6)
    assert (grad == 0.0) == grad_zero
    assert stats["clip_frac"] == (1.0 if grad_zero else 0.0)
    assert stats["clip_frac_dual"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(ratio) == stats["ratio_max"]


def test_asymmetric_clip_range():
    loss, _, _ = _loss(1.5, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.28, abs=1e-6)
    loss, _, _ = _loss(0.5, -1.0, clip_low=0.1, clip_high=0.28)
    assert loss == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("c, value, capped", [(3.0, 3.0, True), (6.0, 5.0, False)])
def test_dual_clip_caps_a_negative_advantage(c, value, capped):
    # rho = 5, A = -1: -min(rho A, clip(rho) A) = 5; the dual clip caps it at -c A = c
    loss, grad, stats = _loss(5.0, -1.0, clip_ratio_c=c)
    assert loss == pytest.approx(value, rel=1e-6)
    assert (grad == 0.0) == capped
    assert stats["clip_frac_dual"] == (1.0 if capped else 0.0)
    # a positive advantage is never dual-clipped: rho = 5, A = 1 -> -clip(rho) A = -1.2
    loss, _, stats = _loss(5.0, 1.0, clip_ratio_c=c)
    assert loss == pytest.approx(-1.2, rel=1e-6)
    assert stats["clip_frac_dual"] == 0.0


def test_kl_estimators_and_coefficient():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(0.5))
    expected = {
        "k1": math.log(2),  # log pi - log pi_ref
        "k2": 0.5 * math.log(2) ** 2,  # (log pi - log pi_ref)^2 / 2
        "k3": 0.5 + math.log(2) - 1,  # exp(ref - logp) - (ref - logp) - 1
    }
    for estimator, value in expected.items():
        g = GRPOConfig(kl_coef=0.001, kl_estimator=estimator)
        loss, stats = grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), g, 1)
        assert stats["kl"] == pytest.approx(value, rel=1e-6), estimator
        assert loss.item() == pytest.approx(0.001 * value, rel=1e-6), estimator
        # zero when the policy equals the reference
        _, same = grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 1), g, 1)
        assert same["kl"] == 0.0


def test_k3_is_clamped_and_padding_never_makes_nan():
    # token 0: a real token whose reference log-ratio is extreme (+100); token 1: padding
    # whose log-probs are -inf, as a fully masked row can give
    logp = torch.tensor([[-100.0, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[-100.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    g = GRPOConfig(kl_coef=1.0)
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0]), mask, g, 1)
    # pg = -A * rho = -1; k3 of log-ratio clamped to 20 is e^20 - 21, clamped to 10
    assert loss.item() == pytest.approx(-1.0 + 10.0)
    assert stats["kl"] == pytest.approx(10.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0.0


# sequence 0 has 1 token, sequence 1 has 3; pads hold huge values that must not count.
# Per-token pg = -A (ratio 1): tokens -2 | +1, +1, +1.
AGG_LOGP = torch.tensor([[0.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
AGG_MASK = torch.tensor([[1, 0, 0], [1, 1, 1]])
AGG_ADV = torch.tensor([2.0, -1.0])


@pytest.mark.parametrize(
    "loss_agg, value",
    [
        ("token-mean", (-2 + 3) / 4),  # over the 4 tokens
        ("seq-mean-token-mean", (-2 + 1) / 2),  # each sequence's token-mean, then their mean
        ("seq-mean-token-sum", (-2 + 3) / 2),  # each sequence's token-sum, then their mean
    ],
)
def test_loss_aggregation_modes_split_like_the_whole_batch(loss_agg, value):
    g = GRPOConfig(kl_coef=0.0, loss_agg=loss_agg)
    denom = loss_denominator([1, 3], g)
    loss, stats = grpo_loss(AGG_LOGP, AGG_LOGP, AGG_LOGP, AGG_ADV, AGG_MASK, g, denom)
    assert loss.item() == pytest.approx(value)
    assert stats["tokens"] == 4
    # micro-batches (or ranks): the parts, each over the whole batch's denominator, add up
    parts = [
        grpo_loss(
            *(t[i : i + 1] for t in (AGG_LOGP,) * 3),
            AGG_ADV[i : i + 1],
            AGG_MASK[i : i + 1],
            g,
            denom,
        )[0]
        for i in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(value)


def test_all_equal_group_gives_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4, 5))
    logp = token_logprobs(logits, targets)
    adv, flat = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), n=4)
    assert flat == 1
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(4, 5), NO_KL, 20)
    loss.backward()
    assert logits.grad.abs().max().item() == 0.0
    # the same batch with mixed rewards does move the policy
    logits.grad = None
    logp = token_logprobs(logits, targets)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), n=4)
    grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(4, 5), NO_KL, 20)[0].backward()
    assert logits.grad.abs().max().item() > 0.0


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    t = torch.tensor([[0]])
    assert token_logprobs(logits, t).item() == pytest.approx(-math.log1p(math.exp(-2.0)))
    assert token_logprobs(logits, t, temperature=2.0).item() == pytest.approx(
        -math.log1p(math.exp(-1.0))
    )


def test_truncated_importance_weights_cap_the_stale_ratio():
    from rayrl.learner.grpo import is_weights

    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    rollout = torch.log(torch.tensor([[0.5, 0.25, 0.1, float("nan")]]))  # last: unknown
    w = is_weights(old, rollout, cap=2.0)
    # w_t = min(pi_old / pi_rollout, C): 1, 2, min(5, 2), and 1 where vLLM gave no log-prob
    assert w[0].tolist() == pytest.approx([1.0, 2.0, 2.0, 1.0])
    assert is_weights(old, rollout, cap=10.0)[0].tolist() == pytest.approx([1.0, 2.0, 5.0, 1.0])


@pytest.mark.parametrize("cap", [2.0, 4.0])
def test_is_weight_scales_each_tokens_policy_gradient(cap):
    """A token sampled by a stale policy at a third of pi_old's probability: its gradient is
    weighted by min(3, cap); the KL term is not weighted."""
    from rayrl.learner.grpo import is_weights

    g = GRPOConfig(kl_coef=0.0, is_cap=cap)
    old = torch.zeros(1, 1)
    w = is_weights(old, torch.full((1, 1), math.log(1 / 3)), g.is_cap)
    grads = []
    for weight in (None, w):
        logp = torch.zeros(1, 1, requires_grad=True)
        loss, stats = grpo_loss(logp, old, old, torch.tensor([1.0]), torch.ones(1, 1), g, 1, weight)
        loss.backward()
        grads.append(logp.grad.item())
    assert grads[1] == pytest.approx(min(3.0, cap) * grads[0])
    assert stats["is_weight_mean"] == pytest.approx(min(3.0, cap)) == stats["is_weight_max"]
    assert stats["is_capped_frac"] == (1.0 if cap < 3 else 0.0)


def test_the_rollout_is_off_policy_when_overlapped_or_not_fp32():
    from rayrl.config import ResourcesConfig
    from rayrl.learner.grpo import off_policy

    fp32 = ResourcesConfig()
    assert not off_policy(GRPOConfig(), fp32)  # the paper's synchronous fp32 loop
    assert off_policy(GRPOConfig(async_steps=1), fp32)
    assert off_policy(GRPOConfig(), ResourcesConfig(vllm_dtype="bfloat16"))
