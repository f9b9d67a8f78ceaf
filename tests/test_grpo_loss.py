"""GRPO loss against hand-computed values."""

import math

import pytest
import torch

from rayrl.learner.grpo import group_advantages, grpo_loss, token_logprobs


def test_group_normalised_advantages():
    adv, flat = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), n=3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3) -> (1 - 1/3)/0.57735 = 1.1547, (0 - 1/3)/0.57735 = -0.57735
    assert adv[:3].tolist() == pytest.approx([1.1547005, -0.5773503, -0.5773503], abs=1e-6)
    # group 2: mean 2/3 -> -1.1547, 0.57735, 0.57735
    assert adv[3:].tolist() == pytest.approx([-1.1547005, 0.5773503, 0.5773503], abs=1e-6)
    assert flat == 0


def test_all_equal_groups_are_counted_and_have_zero_advantage():
    adv, flat = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), n=2)
    assert flat == 2
    assert adv[:4].abs().max() == 0.0
    assert adv[4] > 0 > adv[5]


def _loss(ratio, adv, **kw):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, stats = grpo_loss(
        logp, old, logp.detach(), torch.tensor([adv]), torch.ones(1, 1), kl_coef=0.0, **kw
    )
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, adv, value, grad_zero",
    [
        (1.5, 1.0, -1.2, True),  # positive advantage, ratio above 1+eps_high: clipped, no gradient
        (0.5, 1.0, -0.5, False),  # positive advantage, low ratio: unclipped (pessimistic min)
        (0.5, -1.0, 0.8, True),  # negative advantage, ratio below 1-eps_low: clipped
        (1.5, -1.0, 1.5, False),  # negative advantage, high ratio: unclipped
        (1.1, 1.0, -1.1, False),  # inside the trust region
    ],
)
def test_clipping_on_both_sides(ratio, adv, value, grad_zero):
    loss, grad, stats = _loss(ratio, adv)
    assert loss == pytest.approx(value, abs=1e-6)
    assert (grad == 0.0) == grad_zero
    assert stats["clip_frac"] == (1.0 if grad_zero else 0.0)


def test_asymmetric_clip_range():
    loss, _, _ = _loss(1.5, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.28, abs=1e-6)
    loss, _, _ = _loss(0.5, -1.0, clip_low=0.1, clip_high=0.28)
    assert loss == pytest.approx(0.9, abs=1e-6)


def test_k3_kl_value_and_coefficient():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(0.5))
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    expected = 0.5 + math.log(2) - 1
    loss, stats = grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), kl_coef=0.001)
    assert stats["kl"] == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.001 * expected, rel=1e-6)
    # k3 is zero when the policy equals the reference, and non-negative otherwise
    _, same = grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 1))
    assert same["kl"] == 0.0


def test_token_mean_ignores_padding_and_weights_tokens_equally():
    # sequence 0 has 1 token, sequence 1 has 3; pads hold huge values that must not count
    logp = torch.tensor([[0.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logp, logp, logp, adv, mask, kl_coef=0.0)
    # per-token pg = -A (ratio 1): tokens -2, +1, +1, +1 -> mean 0.25 (a seq-mean would give -0.5)
    assert loss.item() == pytest.approx(0.25)
    assert stats["tokens"] == 4
    # micro-batching: the sum of per-sequence losses with the batch's token count equals the batch loss
    parts = [
        grpo_loss(
            logp[i : i + 1],
            logp[i : i + 1],
            logp[i : i + 1],
            adv[i : i + 1],
            mask[i : i + 1],
            kl_coef=0.0,
            num_tokens=4,
        )[0]
        for i in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(loss.item())


def test_all_equal_group_gives_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4, 5))
    logp = token_logprobs(logits, targets)
    adv, flat = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), n=4)
    assert flat == 1
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(4, 5), kl_coef=0.0)
    loss.backward()
    assert logits.grad.abs().max().item() == 0.0
    # the same batch with mixed rewards does move the policy
    logits.grad = None
    logp = token_logprobs(logits, targets)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), n=4)
    grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(4, 5), kl_coef=0.0)[0].backward()
    assert logits.grad.abs().max().item() > 0.0


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    t = torch.tensor([[0]])
    assert token_logprobs(logits, t).item() == pytest.approx(-math.log1p(math.exp(-2.0)))
    assert token_logprobs(logits, t, temperature=2.0).item() == pytest.approx(
        -math.log1p(math.exp(-1.0))
    )
