"""score / score_detailed: route a response to its verifier by the row's data_source (and ability)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from rayrl.rewards.code import score_code
from rayrl.rewards.logic import score_logic
from rayrl.rewards.math import score_math
from rayrl.rewards.stem import score_stem
from rayrl.rewards.synthetic import score_synthetic
from rayrl.rewards.verdict import Verdict

DEFAULT_TIMEOUT_S = 5.0
# guru prefixes first, then names seen in the wild (openai/gsm8k, aime2024, aimeamc2023, ...)
_PREFIXES = (
    ("synthetic", "synthetic"),
    ("math", "math"),
    ("stem", "stem"),
    ("logic", "logic"),
    ("codegen", "code"),
)
_MATH_NAMES = ("gsm8k", "aime", "amc", "math", "olympiad", "minerva")
_ABILITIES = {
    "math": "math",
    "stem": "stem",
    "logic": "logic",
    "logical_reasoning": "logic",
    "codegen": "code",
    "code": "code",
}


def verifier_for(data_source: str, ability: str | None = None) -> str:
    """'math', 'stem', 'logic', 'code' or 'synthetic'. Unknown sources default to math (a boxed answer)."""
    name = data_source.lower()
    for prefix, kind in _PREFIXES:
        if name.startswith(prefix):
            return kind
    if any(m in name for m in _MATH_NAMES):
        return "math"
    return _ABILITIES.get((ability or "").lower(), "math")


def score_detailed(
    data_source: str,
    response: str,
    ground_truth: str | Mapping,
    ability: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Verdict:
    """Score one response. Never raises on hostile input: failures come back as reason="error"."""
    start = time.monotonic()
    kind = verifier_for(data_source, ability)
    try:
        if kind == "synthetic":
            verdict = score_synthetic(response, ground_truth)
        elif kind == "math":
            verdict = score_math(response, ground_truth, timeout_s)
        elif kind == "stem":
            verdict = score_stem(response, ground_truth)
        elif kind == "logic":
            verdict = score_logic(response, ground_truth)
        else:
            verdict = score_code(response, ground_truth, timeout_s)
    except Exception as e:  # noqa: BLE001 - a verifier bug must cost one sample, not the run
        logging.getLogger(__name__).warning("%s verifier failed: %s", kind, type(e).__name__)
        verdict = Verdict(0.0, None, "error")
    return Verdict(verdict.score, verdict.extracted, verdict.reason, time.monotonic() - start)


def score(
    data_source: str,
    response: str,
    ground_truth: str | Mapping,
    ability: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> float:
    """1.0 if the response's final answer is correct, else 0.0."""
    return score_detailed(data_source, response, ground_truth, ability, timeout_s).score
