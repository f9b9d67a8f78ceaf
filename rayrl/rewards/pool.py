"""RewardPool: Ray actors that score batches in parallel, replacing any actor that dies.

Each actor runs score_detailed, or a rewards.custom function (custom.py) for an item that
carries its row and rule, so every item already has its own hard timeout (isolate.py,
sandbox.py). The pool hands out chunks one at a time per actor; a chunk whose actor died is
retried once on a fresh actor, and scored as "error" if that one dies too.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrl.rewards.custom import Rule, check_failures, loaded, score_custom
from rayrl.rewards.dispatch import DEFAULT_TIMEOUT_S, score_detailed
from rayrl.rewards.math import warm
from rayrl.rewards.verdict import Verdict

# (data_source, response, ground_truth), scored by rayrl's verifiers, or
# (data_source, response, ground_truth, row, rule), scored by the rule's function.
Item = tuple[str, str, str | Mapping] | tuple[str, str, Any, dict, Rule]


def score_item(item: Item, timeout_s: float) -> Verdict:
    if len(item) == 5:
        _, response, truth, row, rule = item
        return score_custom(rule, response, truth, row, timeout_s)
    ds, response, truth = item
    return score_detailed(ds, response, truth, timeout_s=timeout_s)


@ray.remote(max_restarts=0)
class RewardWorker:
    def __init__(self):
        warm()  # start the math worker now, not under the first item's timeout

    def ready(self) -> bool:
        return True

    def custom_functions(self) -> list[str]:
        """The rewards.custom functions this worker has scored with, each in its own
        isolated process."""
        return loaded()

    def score(self, items: list[Item], timeout_s: float) -> list[Verdict]:
        return [score_item(item, timeout_s) for item in items]


class RewardPool:
    def __init__(
        self,
        num_workers: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        num_cpus_per_worker: float = 1.0,
        placement_group: PlacementGroup | None = None,
        bundle_index: int = -1,
    ):
        """Inside a Ray Tune trial, pass ray.util.get_current_placement_group() (or rely on the
        trial capturing child tasks) and a small num_cpus_per_worker such as 0.1."""
        self.timeout_s = timeout_s
        self._options: dict = {"num_cpus": num_cpus_per_worker}
        if placement_group is not None:
            self._options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_index
            )
        self.actors = [RewardWorker.options(**self._options).remote() for _ in range(num_workers)]
        ray.get([a.ready.remote() for a in self.actors])
        self._counts: Counter = Counter()
        self._seconds = 0.0

    def score(self, items: list[Item]) -> list[Verdict]:
        """Verdicts in item order. Raises CustomRewardError when a rewards.custom function
        failed on more than its share of this batch's calls (custom.check_failures)."""
        start = time.monotonic()
        size = max(
            1, math.ceil(len(items) / (4 * len(self.actors)))
        )  # 4 chunks per actor balance load
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        results: list[list[Verdict] | None] = [None] * len(chunks)
        tries = [0] * len(chunks)
        todo = deque(range(len(chunks)))
        idle = list(range(len(self.actors)))
        running: dict = {}  # object ref -> (actor index, chunk index)
        while todo or running:
            while todo and idle:
                w, c = idle.pop(), todo.popleft()
                running[self.actors[w].score.remote(chunks[c], self.timeout_s)] = (w, c)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            w, c = running.pop(ref)
            try:
                results[c] = ray.get(ref)
            except RayActorError:  # died, or unreachable: either way, a fresh actor takes over
                ray.kill(self.actors[w])
                self.actors[w] = RewardWorker.options(**self._options).remote()
                self._counts["restarts"] += 1
                tries[c] += 1
                if tries[c] < 2:
                    todo.appendleft(c)
                else:
                    died = "the reward actor died twice on this chunk"
                    results[c] = [Verdict(0.0, None, "error", error=died)] * len(chunks[c])
            idle.append(w)
        verdicts = [v for chunk in results for v in chunk]
        self._counts["items"] += len(verdicts)
        self._counts.update(v.reason for v in verdicts)
        self._seconds += time.monotonic() - start
        check_failures(items, verdicts)
        return verdicts

    def metrics(self) -> dict:
        c = self._counts
        return {
            "items": c["items"],
            "matched": c["matched"],
            "wrong": c["wrong"],
            "no_answer": c["no_answer"],
            "timeouts": c["timeout"],
            "errors": c["error"],
            "restarts": c["restarts"],
            "seconds": self._seconds,
            "items_per_s": c["items"] / self._seconds if self._seconds else 0.0,
        }

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
