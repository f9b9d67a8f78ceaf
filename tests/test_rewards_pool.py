"""RewardPool on a real local Ray: same verdicts as in-process, metrics, killed actors replaced."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayrl.rewards import score_detailed
from rayrl.rewards.pool import RewardPool

FIXTURES = Path(__file__).parent / "fixtures"
SLOW_TESTS = json.dumps({"functional": "def check(f):\n    assert f(1) == 2\n\ncheck(inc)\n"})


def slow_code_item(seconds: float, correct: bool = True) -> tuple[str, str, str]:
    body = "x + 1" if correct else "x"
    code = f"import time\n\ndef inc(x):\n    time.sleep({seconds})\n    return {body}\n"
    return ("codegen__humaneval", f"```python\n{code}```", SLOW_TESTS)


def mixed_batch(guru_dir: Path) -> list[tuple[str, str, object]]:
    items = []
    math_rows = pq.read_table(
        guru_dir / "math_curriculum" / "math__full_difficulty_ordered_test_500.parquet"
    ).to_pylist()
    for i, row in enumerate(math_rows[:30]):
        gt = row["reward_model"]["ground_truth"]
        answer = gt if i % 2 == 0 else math_rows[i + 1]["reward_model"]["ground_truth"]
        items.append((row["data_source"], f"... so the answer is \\boxed{{{answer}}}", gt))
    for row in pq.read_table(guru_dir / "online_eval" / "stem__supergpqa_200.parquet").to_pylist()[
        :5
    ]:
        items.append((row["data_source"], "\\boxed{C}", row["reward_model"]["ground_truth"]))
    logic = pq.read_table(
        guru_dir / "online_eval" / "logic__zebra_puzzle_dataset_200.parquet"
    ).to_pylist()[:3]
    for row in logic:
        items.append(
            (
                row["data_source"],
                f"<answer>{json.dumps(logic[0]['reward_model']['ground_truth'])}</answer>",
                row["reward_model"]["ground_truth"],
            )
        )
    human = pq.read_table(guru_dir / "online_eval" / "codegen__humaneval_164.parquet").to_pylist()
    for index, sol in json.loads((FIXTURES / "humaneval_solutions.json").read_text()).items():
        if index.isdigit():
            for kind in ("right", "wrong"):
                row = human[int(index)]
                items.append(
                    (
                        row["data_source"],
                        f"```python\n{sol[kind]}```",
                        row["reward_model"]["ground_truth"],
                    )
                )
    items += [("synthetic_arith", f"\\boxed{{{n}}}", "46") for n in (46, 45, "")]
    return items


@pytest.fixture(scope="module")
def pool(ray_session):
    pool = RewardPool(num_workers=2, timeout_s=10.0, num_cpus_per_worker=0.5)
    yield pool
    pool.shutdown()


def test_pool_agrees_with_in_process(pool: RewardPool, guru_dir: Path) -> None:
    items = mixed_batch(guru_dir)
    got = pool.score(items)
    want = [score_detailed(*item, timeout_s=10.0) for item in items]
    assert [(v.score, v.reason, v.extracted) for v in got] == [
        (v.score, v.reason, v.extracted) for v in want
    ]
    assert {v.reason for v in got} >= {"matched", "wrong", "no_answer"}


def test_metrics_count_every_item(pool: RewardPool) -> None:
    before = pool.metrics()
    verdicts = pool.score(
        [("math__x", "\\boxed{2}", "2"), ("math__x", "\\boxed{3}", "2"), ("math__x", "no box", "2")]
    )
    after = pool.metrics()
    assert [v.reason for v in verdicts] == ["matched", "wrong", "no_answer"]
    assert after["items"] - before["items"] == 3
    for key in ("matched", "wrong", "no_answer"):
        assert after[key] - before[key] == 1
    assert after["items_per_s"] > 0 and after["restarts"] == before["restarts"]


def test_killed_actor_is_replaced_and_its_chunk_retried(pool: RewardPool) -> None:
    import ray

    restarts = pool.metrics()["restarts"]
    items = [slow_code_item(0.3, correct=i % 3 != 0) for i in range(12)]
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(pool.score(items)))
    runner.start()
    time.sleep(1.0)
    assert runner.is_alive(), "the batch should still be running when the actor is killed"
    ray.kill(pool.actors[0])
    runner.join(timeout=120)
    assert [v.score for v in out] == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    assert pool.metrics()["restarts"] == restarts + 1
    assert pool.score([("synthetic_arith", "\\boxed{46}", "46")] * 4)[0].score == 1.0


def test_chunk_that_dies_twice_is_scored_as_error(ray_session) -> None:
    import ray

    pool = RewardPool(num_workers=1, timeout_s=10.0, num_cpus_per_worker=0.5)
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(pool.score([slow_code_item(5.0)])))
    runner.start()
    while runner.is_alive():  # kill every actor the pool puts on the chunk
        time.sleep(0.5)
        if runner.is_alive():
            ray.kill(pool.actors[0])
    assert [v.reason for v in out] == ["error"]
    assert pool.metrics()["restarts"] >= 2
    assert pool.score([("synthetic_arith", "\\boxed{46}", "46")])[0].score == 1.0
    pool.shutdown()


def test_pool_in_a_placement_group(ray_session) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 0.5}])
    ray.get(pg.ready())
    pool = RewardPool(num_workers=2, num_cpus_per_worker=0.25, placement_group=pg)
    # both actors sit in the bundle: none of its CPU is left
    assert ray.available_resources().get(f"CPU_group_{pg.id.hex()}", 0.0) == 0.0
    assert pool.score([("synthetic_arith", "\\boxed{46}", "46")] * 4)[0].score == 1.0
    pool.shutdown()
    remove_placement_group(pg)
