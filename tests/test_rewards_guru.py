"""Issue 3 acceptance on the real guru data: ground truths wrapped in a box score 1.0, another row's
ground truth scores 0.0, and every exception is listed in tests/fixtures/reward_misses.json."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayrl.rewards import score_detailed

FIXTURE = Path(__file__).parent / "fixtures" / "reward_misses.json"
MATH_FILES = [
    "math_curriculum/math__full_difficulty_ordered_test_500.parquet",
    "online_eval/aime2024.parquet",
    "online_eval/amc2023.parquet",
    "online_eval/gsm8k.parquet",
    "online_eval/math__math_500.parquet",
]
HELD_OUT = MATH_FILES[0]


def rows(guru_dir: Path, name: str) -> list[dict]:
    return pq.read_table(guru_dir / name).to_pylist()


def wrap(gt: str) -> str:
    return f"We expand, simplify and check the cases... so the answer is \\boxed{{{gt}}}"


def misses(guru_dir: Path, name: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows(guru_dir, name)):
        gt = row["reward_model"]["ground_truth"]
        v = score_detailed(row["data_source"], wrap(gt), gt, ability=row["ability"])
        if v.score != 1.0:
            out.append({"index": i, "ground_truth": gt, "reason": v.reason})
    return out


@pytest.mark.parametrize("name", MATH_FILES)
def test_boxed_ground_truth_scores_one(guru_dir: Path, name: str) -> None:
    n = len(rows(guru_dir, name))
    found = misses(guru_dir, name)
    expected = json.loads(FIXTURE.read_text())["boxed_ground_truth_misses"][name]
    assert found == expected, (
        "misses changed: update tests/fixtures/reward_misses.json with the reason"
    )
    assert 1 - len(found) / n >= 0.99


def cross_row_matches(guru_dir: Path, name: str) -> tuple[int, list[list[str]]]:
    """Score each row against the next row's (different) ground truth; return (n, the 1.0s)."""
    data = rows(guru_dir, name)
    gts = [r["reward_model"]["ground_truth"] for r in data]
    hits, n = [], 0
    for i, row in enumerate(data):
        other = next(
            (
                gts[(i + k) % len(gts)]
                for k in range(1, len(gts))
                if gts[(i + k) % len(gts)] != gts[i]
            ),
            None,
        )
        if other is None:
            continue
        n += 1
        if (
            score_detailed(row["data_source"], wrap(other), gts[i], ability=row["ability"]).score
            != 0.0
        ):
            hits.append([gts[i], other])
    return n, hits


@pytest.mark.parametrize(
    "name", [HELD_OUT, "online_eval/math__math_500.parquet", "online_eval/gsm8k.parquet"]
)
def test_other_rows_ground_truth_scores_zero(guru_dir: Path, name: str) -> None:
    n, hits = cross_row_matches(guru_dir, name)
    expected = json.loads(FIXTURE.read_text())["cross_row_matches"][name]
    assert hits == expected, "cross-row matches changed: update tests/fixtures/reward_misses.json"
    assert 1 - len(hits) / n >= 0.99


def equivalent_form(gt: str) -> str:
    """Another spelling of the same answer, derived without the code under test."""
    s = gt.strip()
    if re.fullmatch(r"-?\d+", s):
        return f"{s}.0"
    m = re.fullmatch(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}", s)
    if (
        m
        and int(m.group(3))
        and 10**6 % Fraction(int(m.group(2)), int(m.group(3))).denominator == 0
    ):
        return m.group(1) + format(float(Fraction(int(m.group(2)), int(m.group(3)))), "f").rstrip(
            "0"
        ).rstrip(".")
    return f"$ {s.replace(chr(92) + 'frac', chr(92) + 'dfrac')} $"


def test_equivalent_spellings_on_held_out(guru_dir: Path) -> None:
    data = rows(guru_dir, HELD_OUT)
    bad = []
    for row in data:
        gt = row["reward_model"]["ground_truth"]
        response = f"<think>Perhaps \\boxed{{0}}?</think> Checking again gives \\boxed{{{equivalent_form(gt)}}}."
        if score_detailed(row["data_source"], response, gt).score != 1.0:
            bad.append(gt)
    assert len(bad) / len(data) <= 0.01, bad


def test_stem_and_logic_ground_truths(guru_dir: Path) -> None:
    for row in rows(guru_dir, "online_eval/stem__supergpqa_200.parquet"):
        gt = row["reward_model"]["ground_truth"]
        assert score_detailed(row["data_source"], wrap(gt), gt).score == 1.0
        other = "A" if gt != "A" else "B"
        assert score_detailed(row["data_source"], wrap(other), gt).score == 0.0
    data = rows(guru_dir, "online_eval/logic__zebra_puzzle_dataset_200.parquet")
    for i, row in enumerate(data):
        gt = row["reward_model"]["ground_truth"]
        response = f"So the grid is <answer> {json.dumps(gt)} </answer>"
        assert score_detailed(row["data_source"], response, gt).score == 1.0
        other = data[(i + 1) % len(data)]["reward_model"]["ground_truth"]
        assert (
            score_detailed(row["data_source"], f"<answer>{json.dumps(other)}</answer>", gt).score
            == 0.0
        )
