"""The GRPO objective (Shao et al. 2024), as configured in the paper (appendix A.2)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one group of n samples per prompt.

    Returns the per-sample advantages and the number of groups whose rewards are all
    equal: those carry no policy-gradient signal.
    """
    r = rewards.float().view(-1, n)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # unbiased, as veRL's GRPO
    adv = (r - mean) / (std + eps)
    flat_groups = int((r.max(dim=1).values == r.min(dim=1).values).sum())
    return adv.view(-1), flat_groups


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(y_t | y_<t) of the given tokens, under the sampling temperature."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.001,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus k3 KL to the reference, token-mean.

    logp/old_logp/ref_logp/mask are [batch, time]; advantages is [batch].
    num_tokens is the token-mean denominator; pass the whole batch's count when the
    batch is split into micro-batches, so the sum of micro-batch losses is the batch loss.
    """
    mask = mask.float()
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)  # rho_t = pi / pi_old
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # -min(rho A, clip(rho) A)
    log_r = ref_logp - logp
    kl = torch.exp(log_r) - log_r - 1.0  # k3 estimator of KL(pi || pi_ref), Schulman 2020
    per_token = pg + kl_coef * kl
    denom = float(num_tokens) if num_tokens is not None else mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / denom  # token-mean
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        stats = {
            "pg_loss": float((pg * mask).sum() / n),
            "kl": float((kl * mask).sum() / n),
            "clip_frac": float(((pg_clipped > pg_unclipped).float() * mask).sum() / n),
            "tokens": float(mask.sum()),
        }
    return loss, stats
