"""The GRPO objective (Shao et al. 2024), as configured in the paper (appendix A.2) and run
by veRL 0.3.1: PPO-clip with dual clip, a KL loss to the reference, and one of veRL's
loss aggregations over the whole batch. The variants the field compares are knobs of
GRPOConfig: the GSPO and CISPO policy losses, Dr. GRPO's and ScaleRL's advantage
normalisations and Dr. GRPO's constant length normaliser, and DAPO's overlong penalty.
"""

from __future__ import annotations

import torch

from rayrl.config import GRPOConfig, ResourcesConfig

# veRL's bounds: exp() of a clamped log-ratio never overflows, and one token's KL term
# cannot dominate a batch.
LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0


def zero_variance(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Per group of n samples: are its rewards all equal? Such a group has A = 0 for every
    sample under any adv_norm, so it carries no policy-gradient signal."""
    r = rewards.float().view(-1, n)
    return r.max(dim=1).values == r.min(dim=1).values  # max_i r_i = min_i r_i


def group_advantages(
    rewards: torch.Tensor, n: int, eps: float = 1e-6, norm: str = "group_std"
) -> tuple[torch.Tensor, int]:
    """Each sample's advantage, one group of n samples per prompt, by grpo.adv_norm:
    group_std (GRPO), none (Dr. GRPO, Liu et al. 2025) or batch_std (ScaleRL, Khatri et
    al. 2025).

    Returns the per-sample advantages and the number of groups whose rewards are all
    equal (`zero_variance`).
    """
    r = rewards.float().view(-1, n)
    centred = r - r.mean(dim=1, keepdim=True)  # r_i - mean(r_group)
    if norm == "group_std":
        adv = centred / (r.std(dim=1, keepdim=True) + eps)  # / (std(r_group) + eps), unbiased
    elif norm == "batch_std":
        adv = centred / (centred.std() + eps)  # / (std over the batch of the centred r + eps)
    elif norm == "none":
        adv = centred  # Dr. GRPO: no std, so easy and hard prompts are not up-weighted
    else:
        raise ValueError(f"grpo.adv_norm: expected group_std, none or batch_std, got {norm!r}")
    return adv.view(-1), int(zero_variance(rewards, n).sum())


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, overlong reward shaping), added to
    each reward:
    0 up to L_max - L_cache tokens, then linear down to -1 at L_max = max_new_tokens, with
    L_cache = grpo.overlong_buffer. (vLLM stops at L_max, so the paper's -1 past L_max
    never applies; veRL's reward manager computes the same line, unclamped.)"""
    expected = max_new_tokens - buffer  # L_max - L_cache
    penalty = (expected - lengths.float()) / buffer  # ((L_max - L_cache) - |y|) / L_cache
    return penalty.clamp(min=-1.0, max=0.0)  # 0 when |y| <= L_max - L_cache, -1 past L_max


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


def loss_denominator(response_lengths: list[int], g: GRPOConfig) -> float:
    """The whole batch's denominator by g.loss_agg: its response tokens (token-mean), its
    sequences (seq-mean-*), or its sequences times max_new_tokens (seq-mean-token-sum-norm)."""
    if g.loss_agg == "token-mean":
        return float(sum(response_lengths))  # sum_i |o_i|
    if g.loss_agg == "seq-mean-token-sum-norm":
        # G * L_max: Dr. GRPO's constant normaliser, as TRL's loss_type dr_grpo (veRL divides
        # each micro-batch's token sum by its padded width, which is L_max only when padded to it)
        return float(len(response_lengths) * g.max_new_tokens)
    return float(len(response_lengths))  # G


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
    # seq-mean-token-sum: (1/G) sum_i ...; seq-mean-token-sum-norm: (1/(G L_max)) sum_i ...
    return per_seq.sum() / denom


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


# Each policy loss's per-token terms: (pg, ratio, clipped, dual). pg is the token's
# policy-gradient loss, ratio the importance ratio it used, clipped the tokens whose ratio
# was clipped (or its weight truncated), dual those capped by the dual clip.
PolicyTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def ppo_clip_terms(
    log_ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, on: torch.Tensor, g: GRPOConfig
) -> PolicyTerms:
    """GRPO's token-level PPO-clip surrogate with veRL's dual clip."""
    ratio = torch.exp(log_ratio)  # rho_t = pi / pi_old
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - g.clip_low, 1.0 + g.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # -min(rho A, clip(rho) A)
    pg_cap = -adv * g.clip_ratio_c
    dual = on & (adv < 0) & (pg > pg_cap)  # dual clip (Ye et al. 2020): for A < 0, at most -c A
    pg = torch.where(dual, pg_cap, pg)
    return pg, ratio, on & (pg_clipped > pg_unclipped), dual


def gspo_terms(
    log_ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, on: torch.Tensor, g: GRPOConfig
) -> PolicyTerms:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its
    tokens' ratios, clipped at the sequence level by gspo_clip_low/high. In veRL's token
    form, every token carries the sequence's value s_i and the gradient s_i * grad log pi_t,
    so a sequence's token mean is the paper's per-sequence term."""
    mask = on.to(log_ratio.dtype)
    seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    # seq = (1/|o_i|) sum_t log(pi_t / pi_old_t) = log s_i
    logp = torch.where(on, logp, torch.zeros_like(logp))
    log_s = logp - logp.detach() + seq.detach()  # log s_it = sg(log s_i) + log pi_t - sg(log pi_t)
    ratio = torch.exp(log_s.clamp(max=LOG_RATIO_BOUND))  # s_it, equal to s_i in value
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - g.gspo_clip_low, 1.0 + g.gspo_clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # -min(s_i A, clip(s_i) A), no dual clip
    return pg, ratio, on & (pg_clipped > pg_unclipped), torch.zeros_like(on)


def cispo_terms(
    log_ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, on: torch.Tensor, g: GRPOConfig
) -> PolicyTerms:
    """CISPO (MiniMax-M1, Chen et al. 2025; ScaleRL's loss): REINFORCE with the token's
    importance weight truncated at 1 + cispo_clip_high and its gradient stopped, so a
    clipped token still has a gradient (through log pi), only a bounded one."""
    ratio = torch.exp(log_ratio)  # rho_t = pi / pi_old
    weight = ratio.clamp(max=1.0 + g.cispo_clip_high).detach()  # sg(min(rho_t, 1 + eps_high))
    logp = torch.where(on, logp, torch.zeros_like(logp))
    pg = -weight * adv * logp  # -sg(min(rho_t, 1 + eps_high)) A log pi_t
    return pg, ratio, on & (ratio > 1.0 + g.cispo_clip_high), torch.zeros_like(on)


POLICY_LOSSES = {"ppo_clip": ppo_clip_terms, "gspo": gspo_terms, "cispo": cispo_terms}


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
    """g.policy_loss's surrogate (PPO-clip, GSPO or CISPO) plus kl_coef times the KL
    estimate, aggregated by g.loss_agg.

    logp/old_logp/ref_logp/mask are [batch, time]; advantages is [batch]. Everything is
    computed under the mask: padding contributes exactly zero, whatever its log-probs.
    is_weight (`is_weights`, [batch, time]) scales each token's policy-gradient term.
    Returns the loss and its statistics as parts for rayrl/learner/stats.py to merge
    (token sums of the means, the maxima), under the names declared there.
    """
    on = mask > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.unsqueeze(-1)
    log_ratio = torch.where(on, logp - old_logp, zero).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    pg, ratio, clipped, dual = POLICY_LOSSES[g.policy_loss](log_ratio, logp, adv, on, g)
    w = torch.ones_like(pg) if is_weight is None else is_weight
    pg = w * pg  # TIS: min(pi_old / pi_rollout, C) * the policy loss's term
    kl = kl_penalty(logp, torch.where(on, ref_logp, logp), g.kl_estimator)
    per_token = torch.where(on, pg + g.kl_coef * kl, zero)
    loss = aggregate(per_token, mask, g.loss_agg, denom)
    with torch.no_grad():
        stats = {
            "pg_loss": float(torch.where(on, pg, zero).sum()),
            "kl": float(torch.where(on, kl, zero).sum()),
            "clip_frac": float(clipped.sum()),
            "clip_frac_dual": float(dual.sum()),
            "ratio_mean": float(torch.where(on, ratio, zero).sum()),
            "ratio_max": float(torch.where(on, ratio, zero).max()) if on.any() else 0.0,
            "is_weight_mean": float(torch.where(on, w, zero).sum()),
            "is_weight_max": float(torch.where(on, w, zero).max()) if on.any() else 0.0,
            "is_capped_frac": float((on & (w >= g.is_cap)).sum()) if is_weight is not None else 0.0,
            "tokens": float(on.sum()),
        }
    return loss, stats
