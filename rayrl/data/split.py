"""A held-out split that never shares a row with training."""

from __future__ import annotations

import random


def held_out_split(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) with `n` random test rows; both keep the input's relative order."""
    if not 0 < n < len(rows):
        raise ValueError(
            f"held-out size must be in [1, {len(rows) - 1}] for {len(rows)} rows, got {n}"
        )
    test_idx = set(random.Random(seed).sample(range(len(rows)), n))
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    return train, test
