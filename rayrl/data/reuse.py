"""The data-reuse schedule of the paper (appendix A.4).

A run with data budget D_total and reuse factor tau trains on an independent random
subset of D_total / tau prompts that keeps the pool's difficulty distribution, ordered
easy to hard (or shuffled once), and repeated tau times in that same order (never
reshuffled).
"""

from __future__ import annotations

import random
from itertools import groupby

from rayrl.data.curriculum import curriculum_order, pass_rate


def reuse_schedule(
    rows: list[dict], data_budget: int, tau: int, seed: int, order: str = "curriculum"
) -> list[dict]:
    """The D_total prompts one run trains on, in order (DataConfig.order)."""
    if tau < 1 or data_budget < 1:
        raise ValueError(f"data budget and reuse factor must be >= 1, got {data_budget} and {tau}")
    if data_budget % tau:
        raise ValueError(f"reuse factor tau={tau} must divide the data budget {data_budget}")
    unique = data_budget // tau  # |subset| = D_total / tau
    if unique > len(rows):
        raise ValueError(
            f"data budget {data_budget} with tau={tau} needs {unique} unique prompts; the pool has {len(rows)}"
        )
    subset = stratified_sample(rows, unique, seed)
    if order == "curriculum":
        subset = curriculum_order(subset)
    elif order == "shuffled":
        random.Random(seed).shuffle(subset)
    else:
        raise ValueError(f"DataConfig.order: expected 'curriculum' or 'shuffled', got {order!r}")
    return subset * tau  # each pass in the same order


def stratified_sample(rows: list[dict], k: int, seed: int) -> list[dict]:
    """`k` rows that keep the difficulty distribution: one random row from each of k
    equal slices of the pool sorted by difficulty (systematic stratified sampling)."""
    rng = random.Random(seed)
    ordered: list[dict] = []
    # Shuffle within equal difficulty so that ties are drawn at random, not by file order.
    for _, tied in groupby(curriculum_order(rows), key=pass_rate):
        group = list(tied)
        rng.shuffle(group)
        ordered.extend(group)
    n = len(ordered)
    picks = [rng.randrange(i * n // k, (i + 1) * n // k) for i in range(k)]
    return [ordered[i] for i in picks]
