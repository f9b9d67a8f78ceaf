"""One run's data: curriculum-ordered training rows, the held-out set and evaluation sets."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from rayrl.config import Config
from rayrl.data.curriculum import curriculum_order
from rayrl.data.loading import load_rows
from rayrl.data.rows import Malformed
from rayrl.data.synthetic import synthetic_task


@dataclass
class Task:
    train: list[dict]  # easy to hard
    test: list[dict]  # the held-out set that defines test loss
    evals: dict[str, list[dict]] = field(default_factory=dict)
    malformed: list[Malformed] = field(default_factory=list)


def check_data(cfg: Config) -> None:
    """Read every data file of `cfg` now, so that a file or a row out of the schema
    (rayrl/data/SCHEMA.md) fails before any actor starts: a DataError naming file, row and field."""
    d = cfg.data
    if d.source == "guru":
        load_rows(d.train_path, split="train", difficulty=True)
        load_rows(d.test_path, split="test")
    for path in d.eval_paths:
        load_rows(path, split="test")


def load_task(cfg: Config) -> Task:
    d = cfg.data
    if d.source == "synthetic":
        train, test, evals = synthetic_task(
            d.train_size, d.test_size, d.max_digits, d.seed, d.eval_size, d.prompt_style
        )
        task = Task(curriculum_order(train), curriculum_order(test), evals)
    else:
        train = load_rows(d.train_path, split="train", difficulty=True)
        test = load_rows(d.test_path, split="test")
        task = Task(curriculum_order(train.rows), test.rows)
        task.malformed = train.malformed + test.malformed
    for path in d.eval_paths:
        loaded = load_rows(path, split="test")
        name = Path(path).stem
        # A seeded subset bounds the cost of every evaluation; file order is kept.
        keep = sorted(
            random.Random(f"{d.seed}:{name}").sample(
                range(len(loaded.rows)), min(d.eval_size, len(loaded.rows))
            )
        )
        task.evals[name] = [loaded.rows[i] for i in keep]
        task.malformed += loaded.malformed
    return task
