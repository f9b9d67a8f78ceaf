"""The run's metric rows (schema in DESIGN.md), kept in metrics.parquet as they happen."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA = [
    "run_id",
    "family",
    "model",
    "n_params",
    "step",
    "compute_flops",
    "data_samples",
    "unique_samples",
    "rollout_n",
    "reuse_factor",
    "seed",
    "test_loss",
]


class MetricsLog:
    """Append-only from the run's point of view; rewritten atomically so a crash never truncates it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = pd.read_parquet(self.path).to_dict("records")

    def append(self, row: dict[str, Any]) -> None:
        missing = [c for c in SCHEMA if c not in row]
        if missing:
            raise ValueError(f"metric row lacks schema columns {missing}")
        if any(r["step"] == row["step"] for r in self.rows):
            raise ValueError(f"{self.path}: step {row['step']} is already recorded")
        self.rows.append(row)
        self._write()

    def truncate_after(self, step: int) -> int:
        """Drop rows past a checkpoint, so resumed steps are recomputed, never duplicated."""
        before = len(self.rows)
        self.rows = [r for r in self.rows if r["step"] <= step]
        if len(self.rows) != before:
            self._write()
        return before - len(self.rows)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".parquet.tmp")
        pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
