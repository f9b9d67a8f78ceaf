"""Difficulty of a row and the curriculum order: easy first (paper section 2, appendix A.4)."""

from __future__ import annotations

# A row's share of solved samples by some reference model, the first of these that its
# extra_info holds: your own data's pass_rate, guru's Qwen2.5-7B measurement, or the
# synthetic task's proxy.
PASS_RATE_KEYS = ("pass_rate", "qwen2.5_7b_pass_rate", "synthetic_pass_rate")


def pass_rate(row: dict) -> float:
    """How easy a row is, in [0, 1]: higher is easier."""
    extra = row.get("extra_info") or {}
    for key in PASS_RATE_KEYS:
        if extra.get(key) is not None:
            return float(extra[key])
    raise KeyError(
        f"row {extra.get('index', '?')} of {row.get('data_source', '?')} has no difficulty: "
        f"expected extra_info to hold one of {', '.join(PASS_RATE_KEYS)}"
    )


def curriculum_order(rows: list[dict]) -> list[dict]:
    """Easy to hard: decreasing pass rate; ties keep their input order."""
    return sorted(rows, key=lambda r: -pass_rate(r))
