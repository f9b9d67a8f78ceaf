"""A GRPO step's learner statistics, declared once: each name with how its parts merge.

A part is what one micro-batch (or one rank, for its timings) reports. Parts merge the
same way across micro-batches and across ranks:
- sum: added up (token counts; the loss, whose parts are already divided by the updates);
- max: the largest part (ratio_max; per-rank timings, since ranks run side by side);
- mean: parts carry the numerator's sum; `finish` divides it by the sum of the `per` count.
The learner (actor.py) reports parts, the group (group.py) merges ranks and finishes, and
the trainer logs the `LOGGED` names to steps.jsonl. A statistic added to `STATS` reaches
steps.jsonl with no other change; a part with an undeclared name is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Stat:
    name: str
    merge: Literal["sum", "max", "mean"]
    per: str = ""  # mean: the count (a sum statistic) the merged sum is divided by
    logged: bool = True  # written to steps.jsonl (counts are for the caller and the means)


STATS: tuple[Stat, ...] = (
    Stat("loss", "sum"),  # mean over the step's updates of each update's loss
    Stat("pg_loss", "mean", "tokens"),
    Stat("kl", "mean", "tokens"),  # 0 at kl_coef 0: no reference model, nothing computed
    Stat("clip_frac", "mean", "tokens"),
    Stat("clip_frac_dual", "mean", "tokens"),
    Stat("ratio_mean", "mean", "tokens"),
    Stat("ratio_max", "max"),
    Stat("logp_diff_mean", "mean", "logp_diff_tokens"),  # |log pi_vLLM - log pi_old|
    Stat("logp_diff_max", "max"),
    Stat("is_weight_mean", "mean", "tokens"),  # TIS weights min(pi_old / pi_vLLM, is_cap)
    Stat("is_weight_max", "max"),
    Stat("is_capped_frac", "mean", "tokens"),
    Stat("grad_norm", "max"),  # of the last update; every rank holds the same global norm
    Stat("pad_frac", "mean", "slots"),  # padding's share of the training forwards' B x T
    # The learner's seconds by part (of time_learn): the pi_old / pi_ref forwards, the
    # training forwards and backwards, the optimizer steps. Summed within a rank.
    Stat("time_learn_logprobs", "max"),
    Stat("time_learn_fwd_bwd", "max"),
    Stat("time_learn_optimizer", "max"),
    Stat("seconds", "max", logged=False),  # the whole call, per rank
    # Counts.
    Stat("tokens", "sum", logged=False),  # response tokens trained on, every update
    Stat("logp_diff_tokens", "sum", logged=False),  # response tokens with a vLLM log-prob
    Stat("slots", "sum", logged=False),  # B x T of the training forwards, padding included
    Stat("tokens_processed", "sum", logged=False),  # sequence tokens through forward+backward
    Stat("forward_tokens", "sum", logged=False),  # sequence tokens of each forward-only pass
)
BY_NAME = {s.name: s for s in STATS}
LOGGED = tuple(s.name for s in STATS if s.logged)


def merge(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Parts of micro-batches or ranks combined, each statistic by its own rule."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if k not in BY_NAME:
                raise KeyError(f"learner statistic {k!r} is not declared in rayrl/learner/stats.py")
            if k in out:
                v = max(out[k], v) if BY_NAME[k].merge == "max" else out[k] + v
            out[k] = float(v)
    return out


def finish(total: dict[str, float]) -> dict[str, float]:
    """Every statistic of a step from its merged parts; a missing one is 0 (a skipped
    update, or a part no micro-batch reported)."""
    out = {s.name: total.get(s.name, 0.0) for s in STATS}
    for s in STATS:
        if s.merge == "mean":
            out[s.name] = out[s.name] / max(out[s.per], 1.0)  # sum of parts / sum of counts
    return out


# A step whose every group was flat: no optimizer update, no learner tokens, no sync.
SKIPPED = finish({})
