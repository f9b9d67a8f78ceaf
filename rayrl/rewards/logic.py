"""Logic (zebra puzzles): the table in the last <answer> JSON against the ground-truth table."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping

from rayrl.rewards.extract import final_text, last_tag
from rayrl.rewards.verdict import Verdict

MAX_ANSWER_CHARS = 100_000


def _columns(table) -> dict[str, list[str]]:
    """{header: column cells}, case- and space-insensitive; column order does not matter, rows do."""
    header = [str(h).strip().lower() for h in table["header"]]
    rows = [[str(c).strip().lower() for c in row] for row in table["rows"]]
    if len(set(header)) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("ragged or duplicate-column table")
    return {h: [r[i] for r in rows] for i, h in enumerate(header)}


def _load(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # models often write Python-style single quotes


def score_logic(response: str, ground_truth: str | Mapping) -> Verdict:
    answer = last_tag(final_text(response), "answer")
    if answer is None or not answer.strip():
        return Verdict(0.0, answer, "no_answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(0.0, answer[:MAX_ANSWER_CHARS], "wrong")
    gold = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    try:
        pred = _columns(_load(answer.strip()))
    except (ValueError, TypeError, KeyError, SyntaxError, MemoryError, RecursionError):
        return Verdict(0.0, answer, "wrong")
    return Verdict.of(pred == _columns(gold), answer)
