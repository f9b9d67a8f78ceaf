"""The embedded synthetic arithmetic task ("Q:12+34=?A:" -> "\\boxed{46}"): an exact integer match.

This is the hot path of CPU training, so it is a couple of string scans and no regex engine.
"""

from __future__ import annotations

from rayrl.rewards.verdict import Verdict

MAX_DIGITS = 32


def score_synthetic(response: str, ground_truth: str) -> Verdict:
    start = response.rfind("\\boxed{")
    end = response.find("}", start) if start >= 0 else -1
    answer = response[start + 7 : end].strip() if end >= 0 else ""
    if not answer:
        return Verdict(0.0, None, "no_answer")
    digits = answer[1:] if answer[0] == "-" else answer
    # isascii: int() would accept other scripts' digits, which are look-alikes here
    ok = 0 < len(digits) <= MAX_DIGITS and digits.isascii() and digits.isdigit()
    return Verdict.of(ok and int(answer) == int(ground_truth), answer)
