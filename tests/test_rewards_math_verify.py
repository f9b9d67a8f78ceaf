"""rayrl's math verifier against the labels of Math-Verify's own test suite: the cases that fit
rayrl's protocol (see the header of tests/data/math_verify_cases.jsonl for the selection rule).
tools/bench_rewards.py prints the same figures for rayrl and for math-verify itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rayrl.rewards import score

DATA = Path(__file__).parent / "data" / "math_verify_cases.jsonl"
MIN_AGREEMENT = 0.99


def load_cases() -> list[dict]:
    header, *cases = (json.loads(line) for line in DATA.read_text().splitlines())
    assert len(cases) == header["cases"], "the data file lost cases"
    return cases


def response(pred: str) -> str:
    """What a model following rayrl's prompt would write: its final answer in a box."""
    return pred if "\\boxed" in pred or "\\fbox" in pred else f"\\boxed{{{pred}}}"


def figures(correct: Callable[[str, str], bool]) -> dict:
    """Agreement with the labels, leaving out the mislabelled cases, and false positives (said
    correct where the label says wrong) over all cases; correct(response, gold) is the verifier."""
    cases = load_cases()
    said = [correct(response(c["pred"]), c["gold"]) for c in cases]
    judged = [(c, s) for c, s in zip(cases, said) if "mislabelled" not in c]
    misses = [c for c, s in judged if s != bool(c["expected"])]
    return {
        "cases": len(cases),
        "judged": len(judged),
        "agreement": round(1 - len(misses) / len(judged), 4),
        "false_positives": sum(s and not c["expected"] for c, s in zip(cases, said)),
        "misses": [(c["origin"], c["line"]) for c in misses],
    }


def rayrl_correct(resp: str, gold: str) -> bool:
    return score("math", resp, gold) == 1.0


def test_agrees_with_math_verify_labels() -> None:
    got = figures(rayrl_correct)
    assert got["false_positives"] == 0, got
    assert got["agreement"] >= MIN_AGREEMENT, got
