"""Load guru-format rows from parquet files, a folder of them, or a `datasets` name."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rayrl.data.curriculum import PASS_RATE_KEYS
from rayrl.data.rows import REQUIRED, Malformed, missing_field, problem

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


def load_rows(path_or_name: str, split: str = "train", difficulty: bool = False) -> LoadResult:
    """Rows from a parquet file, a folder of parquet files, or a `datasets` name.

    A row without one of the schema's fields (rows.REQUIRED; with `difficulty`, also a pass
    rate in extra_info, which the curriculum and the reuse sampler order by) is a DataError
    naming its file, row and field. Malformed rows are skipped, counted in `.malformed` and
    summarised in one warning.
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        result = validate_rows(read_file(path), str(path), difficulty)
    elif path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: folder holds no .parquet files")
        result = LoadResult()
        for f in files:
            result.extend(validate_rows(pq.read_table(f).to_pylist(), str(f), difficulty))
    else:
        rows = _load_dataset(path_or_name, split)
        result = validate_rows(rows, f"{path_or_name}[{split}]", difficulty)
    warn_malformed(result.malformed)
    return result


def read_file(path: Path) -> list[Any]:
    """The rows of a .parquet, .jsonl (one row a line) or .json (a list of rows) file."""
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            return rows
        return pq.read_table(path).to_pylist()
    except (json.JSONDecodeError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a .parquet, .jsonl or .json file of rows: {e}") from None


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


def validate_rows(raw: list[Any], file: str, difficulty: bool = False) -> LoadResult:
    """Keep usable rows, record the others by file and index; refuse a row that lacks a field."""
    result = LoadResult()
    for i, row in enumerate(raw):
        field_ = missing_field(row) if isinstance(row, dict) else None
        if field_ is None and difficulty and isinstance(row, dict):
            extra = row.get("extra_info")
            if not isinstance(extra, dict) or all(extra.get(k) is None for k in PASS_RATE_KEYS):
                field_ = f"extra_info.{PASS_RATE_KEYS[0]}"
        if field_:
            need = [*REQUIRED, *([f"extra_info.{PASS_RATE_KEYS[0]}"] if difficulty else [])]
            raise DataError(
                f"{file}: row {i}: no field '{field_}' (every row needs {', '.join(need)}; "
                f"the schema is in rayrl/data/SCHEMA.md)"
            )
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
