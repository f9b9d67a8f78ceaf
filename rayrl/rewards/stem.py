"""STEM multiple choice (supergpqa): the option letter in the last box."""

from __future__ import annotations

import re

from rayrl.rewards.extract import final_text, last_boxed
from rayrl.rewards.verdict import Verdict

# `A`, `(A)`, `A)`, `A:`, `A. 0.36g`, `\text{A}`: a letter standing alone at the start
_LETTER = re.compile(r"\(?([A-Z])\)?(?:[\s.:)]|$)", re.ASCII | re.IGNORECASE)
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def score_stem(response: str, ground_truth: str) -> Verdict:
    answer = last_boxed(final_text(response))
    if answer is None or not answer.strip():
        return Verdict(0.0, answer, "no_answer")
    m = _LETTER.match(_WRAPPER.sub(r"\1", answer).strip())
    if m is None:
        return Verdict(0.0, answer, "wrong")
    return Verdict.of(m.group(1).upper() == ground_truth.strip().upper(), answer)
