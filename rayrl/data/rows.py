"""The guru row schema: what a usable row is, and how an unusable one is reported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Malformed:
    """A row that was skipped: where it was and why."""

    file: str
    index: int
    reason: str


# Fields every row must have (rayrl/data/SCHEMA.md). A file whose rows lack one is not in the schema
# and is refused; a row whose field is there but unusable (empty, no role) is skipped.
REQUIRED = ("data_source", "ability", "prompt", "reward_model.ground_truth")


def missing_field(row: Any) -> str | None:
    """The first of REQUIRED that `row` (a mapping) does not have, or None."""
    for name in REQUIRED:
        node = row
        for part in name.split("."):
            if not isinstance(node, dict):  # a null reward_model: a bad value, not the schema
                break
            if part not in node:
                return name
            node = node[part]
    return None


def problem(row: Any) -> str | None:
    """Why `row` cannot be trained or evaluated on, or None when it can."""
    if not isinstance(row, dict):
        return f"expected a mapping, got {type(row).__name__}"
    source = row.get("data_source")
    if not isinstance(source, str) or not source:
        return "no data_source"
    if not isinstance(row.get("ability"), str):
        return "no ability"
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return "prompt is not a non-empty list of messages"
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            return f"prompt[{i}] has no role"
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            return f"prompt[{i}] has empty content"
    reward = row.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    # Logic puzzles carry a table (a dict) as ground truth; empty or missing is unusable.
    if truth is None or (isinstance(truth, (str, dict, list)) and not truth):
        return "no ground truth"
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        return "extra_info is not a mapping"
    return None
