"""Codegen (HumanEval style): the last fenced code block, run with the functional tests in the sandbox."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from rayrl.rewards.extract import final_text
from rayrl.rewards.sandbox import run_python
from rayrl.rewards.verdict import Verdict

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    blocks = _FENCE.findall(final_text(response))
    return blocks[-1] if blocks else None


def score_code(response: str, ground_truth: str | Mapping, timeout_s: float) -> Verdict:
    code = extract_code(response)
    if code is None or not code.strip():
        return Verdict(0.0, code, "no_answer")
    tests = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if "functional" not in tests:
        return Verdict(0.0, code, "error")  # only HumanEval-style functional tests are supported
    # the tests end by calling check(entry_point), so running to the end means passing
    result = run_python(f"{code}\n\n{tests['functional']}\n", timeout_s=timeout_s)
    reason = {"passed": "matched", "failed": "wrong", "timeout": "timeout"}[result.status]
    return Verdict(1.0 if reason == "matched" else 0.0, code, reason)
