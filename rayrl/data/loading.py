"""Load guru-format rows from parquet files, a folder of them, or a `datasets` name."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rayrl.data.rows import Malformed, problem

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data source that cannot be read at all (as opposed to single bad rows)."""


@dataclass
class LoadResult:
    rows: list[dict] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)

    def extend(self, other: LoadResult) -> None:
        self.rows.extend(other.rows)
        self.malformed.extend(other.malformed)


def load_rows(path_or_name: str, split: str = "train") -> LoadResult:
    """Rows from a parquet file, a folder of parquet files, or a `datasets` name.

    Malformed rows are skipped, counted in `.malformed` and summarised in one warning.
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        result = validate_rows(pq.read_table(path).to_pylist(), str(path))
    elif path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: folder holds no .parquet files")
        result = LoadResult()
        for f in files:
            result.extend(validate_rows(pq.read_table(f).to_pylist(), str(f)))
    else:
        result = validate_rows(_load_dataset(path_or_name, split), f"{path_or_name}[{split}]")
    warn_malformed(result.malformed)
    return result


def _load_dataset(name: str, split: str) -> list[dict]:
    import datasets  # slow import; only names need it

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types for "not there"
        raise DataError(
            f"{name}: not a parquet file, a folder of parquet files, or a loadable `datasets` name "
            f"(split {split!r}): {e}"
        ) from e
    return ds.to_list()


def validate_rows(raw: list[Any], file: str) -> LoadResult:
    """Keep usable rows, record the others by file and index."""
    result = LoadResult()
    for i, row in enumerate(raw):
        reason = problem(row)
        if reason:
            result.malformed.append(Malformed(file, i, reason))
            continue
        row = {k: v for k, v in row.items() if k != "__index_level_0__"}  # pandas index residue
        row["extra_info"] = dict(row.get("extra_info") or {})
        result.rows.append(row)
    return result


def warn_malformed(malformed: list[Malformed], shown: int = 5) -> None:
    if not malformed:
        return
    per_file = Counter(m.file for m in malformed)
    files = ", ".join(f"{f}: {n}" for f, n in per_file.items())
    examples = "; ".join(f"{m.file}[{m.index}]: {m.reason}" for m in malformed[:shown])
    log.warning("skipped %d malformed rows (%s); e.g. %s", len(malformed), files, examples)
