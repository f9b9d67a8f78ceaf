"""The GRPO objective (Shao et al. 2024), as configured in the paper (appendix A.2) and run
by veRL 0.3.1: PPO-clip with dual clip, a KL loss to the reference, and one of veRL's
loss aggregations over the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rayrl.config import GRPOConfig, ResourcesConfig

# veRL's bounds: exp() of a clamped log-ratio never overflows, and one token's KL term
# cannot dominate a batch.
LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0


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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman 2020)."""
    log_r = ref_logp - logp  # log(pi_ref / pi)
    if estimator == "k1":
        return -log_r  # k1 = log pi - log pi_ref
    if estimator == "k2":
        return 0.5 * log_r.square()  # k2 = (log pi - log pi_ref)^2 / 2
    log_r = log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    k3 = torch.exp(log_r) - log_r - 1.0  # k3 = r - log r - 1, veRL's low_var_kl
    return k3.clamp(-KL_BOUND, KL_BOUND)


def loss_denominator(response_lengths: list[int], loss_agg: str) -> float:
    """The whole batch's denominator: its response tokens (token-mean) or its sequences."""
    return float(sum(response_lengths) if loss_agg == "token-mean" else len(response_lengths))


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, denom: float
) -> torch.Tensor:
    """This shard's part of the batch loss; summed over every shard it is veRL's agg_loss.

    per_token is zero at padding. denom is `loss_denominator` of the whole batch (every
    rank and micro-batch), so the sum of the parts does not depend on how it was split.
    """
    if loss_agg == "token-mean":
        return per_token.sum() / denom  # sum_i sum_t l_it / sum_i |o_i|
    per_seq = per_token.sum(dim=-1)  # sum_t l_it
    if loss_agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1.0)  # (1/|o_i|) sum_t l_it
    return per_seq.sum() / denom  # (1/G) sum_i ...


def off_policy(g: GRPOConfig, r: ResourcesConfig) -> bool:
    """Does the rollout sample from another policy than the learner's pi_old? One update
    behind with async_steps, or another precision than the fp32 learner's."""
    return g.async_steps > 0 or r.vllm_dtype != "float32"


def is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights w_t = min(pi_old / pi_rollout, cap) per token, no gradient.
    1 where the rollout's log-prob is unknown (NaN)."""
    known = rollout_logp.isfinite()
    log_w = torch.where(known, old_logp - rollout_logp.nan_to_num(0.0), 0.0)
    return torch.exp(log_w.clamp(max=LOG_RATIO_BOUND)).clamp(max=cap).detach()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    g: GRPOConfig,
    denom: float,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-clipped surrogate plus kl_coef times the KL estimate, aggregated by g.loss_agg.

    logp/old_logp/ref_logp/mask are [batch, time]; advantages is [batch]. Everything is
    computed under the mask: padding contributes exactly zero, whatever its log-probs.
    is_weight (`is_weights`, [batch, time]) scales each token's policy-gradient term.
    Returns the loss and token sums of its statistics (plus the ratio's max), for the
    caller to divide by the batch's token count.
    """
    on = mask > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.unsqueeze(-1)
    log_ratio = torch.where(on, logp - old_logp, zero).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)  # rho_t = pi / pi_old
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - g.clip_low, 1.0 + g.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # -min(rho A, clip(rho) A)
    pg_cap = -adv * g.clip_ratio_c
    dual = (adv < 0) & (pg > pg_cap)  # dual clip (Ye et al. 2020): for A < 0, at most -c A
    pg = torch.where(dual, pg_cap, pg)
    w = torch.ones_like(pg) if is_weight is None else is_weight
    pg = w * pg  # TIS: min(pi_old / pi_rollout, C) * the clipped surrogate
    kl = kl_penalty(logp, torch.where(on, ref_logp, logp), g.kl_estimator)
    per_token = torch.where(on, pg + g.kl_coef * kl, zero)
    loss = aggregate(per_token, mask, g.loss_agg, denom)
    with torch.no_grad():
        stats = {
            "pg_loss": float(torch.where(on, pg, zero).sum()),
            "kl": float(torch.where(on, kl, zero).sum()),
            "clip_frac": float((on & (pg_clipped > pg_unclipped)).sum()),
            "clip_frac_dual": float((on & dual).sum()),
            "ratio_mean": float(torch.where(on, ratio, zero).sum()),
            "ratio_max": float(torch.where(on, ratio, zero).max()) if on.any() else 0.0,
            "is_weight": float(torch.where(on, w, zero).sum()),
            "is_weight_max": float(torch.where(on, w, zero).max()) if on.any() else 0.0,
            "is_capped": float((on & (w >= g.is_cap)).sum()) if is_weight is not None else 0.0,
            "tokens": float(on.sum()),
        }
    return loss, stats


def merge_stats(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Statistics of micro-batches or ranks combined: sums, except `*_max` keys (maxima)."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = max(out.get(k, v), v) if k.endswith("_max") else out.get(k, 0.0) + v
    return out
