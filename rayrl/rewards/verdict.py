"""The result of scoring one response."""

from __future__ import annotations

from dataclasses import dataclass

REASONS = ("matched", "wrong", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    score: float  # 1.0 or 0.0 (a rewards.custom function may give any finite float)
    extracted: str | None  # the answer taken from the response, None when there is none
    reason: str  # one of REASONS
    seconds: float = 0.0  # wall time spent scoring, for latency metrics
    error: str = ""  # what went wrong, for a rewards.custom function's "error" or "timeout"

    @staticmethod
    def of(ok: bool, extracted: str | None) -> Verdict:
        return Verdict(1.0 if ok else 0.0, extracted, "matched" if ok else "wrong")
