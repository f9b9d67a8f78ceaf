"""Math reward throughput: rayrl (in-process and RewardPool) against math-verify called directly.

Items come in GRPO groups: --prompts rows of the 12,800-row guru training set, --group responses
each. A response is reasoning text ending in a right answer (verbatim or in an equivalent form),
a wrong one (an off-by-some number, another row's answer, or the group's popular wrong answer),
or no final box. The line also carries the agreement of rayrl and of math-verify with the labels of
Math-Verify's own test suite (tests/data/math_verify_cases.jsonl); --suite-only prints only those.
Prints one JSON line (and appends it to --out if given).

    .venv/bin/python tools/bench_rewards.py --prompts 256 --group 8 --workers 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq

GURU = Path(
    os.environ.get(
        "RAYRL_GURU_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "guru"
    )
)
TRAIN = "math_curriculum_sampled/math__sampled_1_4_12800.parquet"
SUITE_TEST = Path(__file__).resolve().parents[1] / "tests" / "test_rewards_math_verify.py"

REASONING = [
    "Let me set up the problem. Let $x$ be the unknown, so $x^2 + {a}x - {b} = 0$.",
    "By the quadratic formula, $x = \\frac{{-{a} \\pm \\sqrt{{{a}^2 + 4 \\cdot {b}}}}}{{2}}$.",
    "Checking the case $n = {a}$: we get ${a} \\times {b} = {c}$, which is consistent.",
    "Wait, I should double-check the boundary: when $k = 0$ the sum is ${b}$.",
    "Summing over all cases gives $\\sum_{{i=1}}^{{{a}}} i = {c}$.",
    "Hmm, that does not match; recompute: $({a} + {b})^2 = {d}$.",
    "So the intermediate value is $\\frac{{{b}}}{{{a}}}$, and we continue.",
]


def equivalent_form(gt: str, rng: random.Random) -> str:
    """A different spelling of the same answer, built without the code under test."""
    s = gt.strip()
    if re.fullmatch(r"-?\d+", s):
        return rng.choice([f"{s}.0", f"{s}.00", f"\\text{{{s}}}", f"{s} \\text{{ units}}"])
    m = re.fullmatch(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        sign = m.group(1)
        if 10**6 % value.denominator == 0:
            return sign + format(float(value), "f").rstrip("0").rstrip(".")
        return f"{sign}{value.numerator}/{value.denominator}"
    return s.replace("\\frac", "\\dfrac") if "\\frac" in s else f"${s}$"


def wrong_form(gt: str, others: list[str], rng: random.Random) -> str:
    s = gt.strip()
    if re.fullmatch(r"-?\d+", s) and rng.random() < 0.5:
        return str(int(s) + rng.choice([-2, -1, 1, 2, 10]))
    return rng.choice(others)


def make_items(prompts: int, group: int, seed: int) -> list[tuple[str, str, str]]:
    rows = pq.read_table(GURU / TRAIN).to_pylist()
    rng = random.Random(seed)
    gts = [r["reward_model"]["ground_truth"] for r in rows]
    items = []
    for row in rng.sample(rows, prompts):
        gt = row["reward_model"]["ground_truth"]
        popular_wrong = wrong_form(gt, gts, rng)
        for _ in range(group):
            nums = {k: rng.randint(2, 99) for k in "abcd"}
            text = " ".join(rng.choice(REASONING).format(**nums) for _ in range(rng.randint(6, 14)))
            roll = rng.random()
            if roll < 0.45:
                answer = gt
            elif roll < 0.55:
                answer = equivalent_form(gt, rng)
            elif roll < 0.90:
                answer = popular_wrong if rng.random() < 0.5 else wrong_form(gt, gts, rng)
            else:
                answer = None
            if rng.random() < 0.3:
                text = f"<think>{text} Maybe \\boxed{{{nums['a']}}}?</think> Let me write it up. {text[:300]}"
            final = (
                f" So the answer is $\\boxed{{{answer}}}$."
                if answer is not None
                else " I am not sure."
            )
            items.append((row["data_source"], text + final, gt))
    return items


def bench_math_verify(items) -> tuple[float, list[bool]]:
    from math_verify import parse, verify

    verify(parse("$1$"), parse("$1$"))  # warm-up, as for ours
    start = time.perf_counter()
    ok = [bool(verify(parse(f"\\boxed{{{gt}}}"), parse(resp))) for _, resp, gt in items]
    return len(items) / (time.perf_counter() - start), ok


def bench_inprocess(items) -> tuple[float, list]:
    from rayrl.rewards import score_detailed
    from rayrl.rewards.math import warm

    warm()
    start = time.perf_counter()
    verdicts = [score_detailed(ds, resp, gt) for ds, resp, gt in items]
    return len(items) / (time.perf_counter() - start), verdicts


def bench_pool(items, workers: int) -> tuple[float, dict]:
    import ray

    from rayrl.rewards.pool import RewardPool

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    pool = RewardPool(num_workers=workers, num_cpus_per_worker=1)
    start = time.perf_counter()
    pool.score(items)
    rate = len(items) / (time.perf_counter() - start)
    metrics = pool.metrics()
    pool.shutdown()
    ray.shutdown()
    return rate, metrics


def bench_suite() -> dict:
    """Agreement with the labels of Math-Verify's tests, and false positives, for rayrl and for
    math-verify scoring the same texts; the figures are the test's own (test_rewards_math_verify)."""
    from math_verify import parse, verify

    spec = importlib.util.spec_from_file_location("math_verify_suite", SUITE_TEST)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    ours = suite.figures(suite.rayrl_correct)
    theirs = suite.figures(lambda resp, gold: bool(verify(parse(gold), parse(resp))))
    return {
        "cases": ours["cases"],
        "judged": ours["judged"],
        "rayrl_agreement": ours["agreement"],
        "rayrl_false_positives": ours["false_positives"],
        "rayrl_misses": ours["misses"],
        "math_verify_agreement": theirs["agreement"],
        "math_verify_false_positives": theirs["false_positives"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--group", type=int, default=8, help="responses per prompt, as in GRPO")
    ap.add_argument("--workers", type=int, default=2, help="RewardPool actors (0 skips the pool)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="append the JSON line to this file")
    ap.add_argument(
        "--suite-only",
        action="store_true",
        help="print only the Math-Verify suite figures (seconds; no guru data; --out left alone)",
    )
    args = ap.parse_args()

    if args.suite_only:
        print(json.dumps({"bench": "rewards_math_verify_suite", **bench_suite()}))
        return
    items = make_items(args.prompts, args.group, args.seed)
    mv_rate, mv_ok = bench_math_verify(items)
    ours_rate, verdicts = bench_inprocess(items)
    result = {
        "bench": "rewards_math",
        "items": len(items),
        "cpus": os.cpu_count(),
        "math_verify_per_s": round(mv_rate, 1),
        "rayrl_inprocess_per_s": round(ours_rate, 1),
        "speedup_inprocess": round(ours_rate / mv_rate, 2),
        "rayrl_reasons": dict(Counter(v.reason for v in verdicts)),
        "rayrl_matched_frac": round(sum(v.score for v in verdicts) / len(items), 4),
        "math_verify_matched_frac": round(sum(mv_ok) / len(items), 4),
        "agreement_with_math_verify": round(
            sum((v.score == 1.0) == m for v, m in zip(verdicts, mv_ok)) / len(items), 4
        ),
        "max_item_s": round(max(v.seconds for v in verdicts), 3),
        "math_verify_suite": bench_suite(),
    }
    if args.workers:
        pool_rate, metrics = bench_pool(items, args.workers)
        result.update(
            rayrl_pool_workers=args.workers,
            rayrl_pool_per_s=round(pool_rate, 1),
            speedup_pool=round(pool_rate / mv_rate, 2),
            pool_timeouts=metrics["timeouts"],
            pool_errors=metrics["errors"],
        )
    line = json.dumps(result)
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
