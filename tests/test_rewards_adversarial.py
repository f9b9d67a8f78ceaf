"""Issue 3's adversarial suite: 200+ hostile responses through a real RewardPool. Nothing hangs
(each item returns within its timeout + 1 s), nothing escapes, and the pool keeps serving."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq

from rayrl.rewards.pool import RewardPool
from rayrl.rewards.verdict import REASONS

TESTS = Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    "reward_hostile", TESTS / "fixtures" / "reward_hostile.py"
)
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)
_spec = importlib.util.spec_from_file_location("sandbox_tests", TESTS / "test_rewards_sandbox.py")
sandbox_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sandbox_tests)

TIMEOUT_S = 1.0


def suite(guru_dir: Path, host) -> list[tuple[str, tuple[str, str, object], float | None]]:
    """(name, (data_source, response, ground truth), expected score)."""
    held_out = pq.read_table(
        guru_dir / "math_curriculum" / "math__full_difficulty_ordered_test_500.parquet"
    ).to_pylist()
    # distinct, non-trivial ground truths: one per hostile answer
    gts = list(
        dict.fromkeys(
            r["reward_model"]["ground_truth"]
            for r in held_out
            if r["reward_model"]["ground_truth"].strip() not in ("0", "1", "e")
        )
    )
    int_gts = [int(g) for g in gts if re.fullmatch(r"\d{2,4}", g) and "0" in g and "1" in g]
    items = [
        (n, ("math__deepscaler_preview", r, gt), e)
        for n, r, gt, e in hostile.math_items(gts, int_gts)
    ]
    items += [(n, ("stem__supergpqa", r, gt), e) for n, r, gt, e in hostile.stem_items()]
    table = pq.read_table(
        guru_dir / "online_eval" / "logic__zebra_puzzle_dataset_200.parquet"
    ).to_pylist()[0]["reward_model"]["ground_truth"]
    items += [
        (n, ("logic__zebra_puzzle_dataset", r, table), e) for n, r, e in hostile.logic_items(table)
    ]
    programs = host.programs()
    if sandbox_tests.namespaces_available():
        programs += hostile.ctypes_programs(host.mark)
    tests = json.dumps({"functional": hostile.CODE_TESTS})
    items += [(n, ("codegen__humaneval", f"```python\n{p}```", tests), e) for n, p, e in programs]
    return items


def test_adversarial_suite(ray_session, guru_dir: Path) -> None:
    host = sandbox_tests.Host()
    items = suite(guru_dir, host)
    assert len(items) >= 200
    pool = RewardPool(num_workers=6, timeout_s=TIMEOUT_S, num_cpus_per_worker=0.5)
    try:
        start = time.monotonic()
        verdicts = pool.score([item for _, item, _ in items])
        elapsed = time.monotonic() - start
    finally:
        host.check_and_clean()
    slowest = max(v.seconds for v in verdicts)
    print(
        f"adversarial: {len(items)} items in {elapsed:.1f}s, slowest item {slowest:.2f}s, {pool.metrics()}"
    )
    for (name, _, expected), v in zip(items, verdicts):
        assert v.seconds <= TIMEOUT_S + 1.0, (name, v.seconds, v.reason)
        assert v.reason in REASONS
        if expected is not None:
            assert v.score == expected, (name, v)
    metrics = pool.metrics()
    assert (
        metrics["timeouts"] > 0 and metrics["restarts"] == 0
    )  # hostile input never kills an actor

    # the pool keeps serving, and correctly
    fine = [
        ("math__x", "so \\boxed{\\frac{1}{2}}", "0.5"),
        ("math__x", "so \\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
        ("math__x", "so \\boxed{3}", "4"),
        (
            "codegen__humaneval",
            f"```python\n{hostile._INC}```",
            json.dumps({"functional": hostile.CODE_TESTS}),
        ),
        ("synthetic_arith", "\\boxed{46}", "46"),
    ]
    assert [v.score for v in pool.score(fine)] == [1.0, 1.0, 0.0, 1.0, 1.0]
    pool.shutdown()
