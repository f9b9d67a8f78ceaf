"""The metrics contract: the one place that says what a metric row holds (rayrl/DESIGN.md), how
the trials talk to Tune, and which law a row belongs to.

Trainer, FitterActor, scheduler, report and `rayrl fit` all use the names below; a row
written here is a row every reader understands. Runs keep their rows in metrics.parquet
as they happen (MetricsLog).
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from rayrl.storage import append_line, replace_atomic

# rayrl/DESIGN.md's metric row: column -> type. Every row has all of them.
COLUMNS: dict[str, type] = {
    "run_id": str,
    "family": str,
    "model": str,
    "n_params": int,
    "step": int,
    "compute_flops": float,
    "data_samples": int,
    "unique_samples": int,
    "rollout_n": int,
    "reuse_factor": int,
    "seed": int,
    "test_loss": float,
}
REQUIRED = tuple(COLUMNS)
# Columns a row may add, with their types (timings are time_<phase>, in seconds).
OPTIONAL: dict[str, type] = {
    # The study variant (rayrl/search.py): its overrides, e.g. grpo.clip_high=0.28; a table
    # without the column is all the default variant.
    "variant": str,
    "test_loss_se": float,
    "compute_flops_all": float,  # C plus rollout generation and the pi_old / reference passes
    # Share of held-out samples with an extractable answer: 1 - answer_rate of the loss is a
    # format failure, the rest wrong answers (what a run learns, besides the format).
    "answer_rate": float,
    # The evaluated step's own statistics (steps.jsonl has every step's).
    "reward_mean": float,
    "response_len": float,
    "zero_var_groups": int,  # groups whose rewards all agree, before dynamic sampling
    "gen_rounds": int,  # generation rounds of the step (dynamic sampling)
    "truncated_frac": float,  # share of the step's responses cut at max_new_tokens
}
# The step statistics a metric row copies (those of OPTIONAL above).
STEP_COLUMNS = ("reward_mean", "response_len", "zero_var_groups", "gen_rounds", "truncated_frac")
BENCHMARK = re.compile(r"test_loss_(?!se$)(\w+?)(_se)?")  # test_loss_<name>[_se]
PASS_AT = re.compile(r"pass_at_\d+(_\w+)?")  # pass_at_<k>[_<name>][_se]
HELD_OUT_PASS_AT = re.compile(r"pass_at_\d+")  # the held-out set's pass@k, a loss to fit
TIMING = re.compile(r"time_\w+")

DEFAULT_VARIANT = "default"  # rayrl.search.DEFAULT: the study's config without overrides
GROUP_SEP = " | "  # between a law group's family and variant

# The held-out set's name among a run's evaluation sets: its loss is the row's test_loss.
HELD_OUT = "held_out"

# Resource axes of the law: X is training compute C or data D.
AXES: dict[str, str] = {"compute": "compute_flops", "data": "data_samples"}
UNITS: dict[str, str] = {"compute": "FLOPs", "data": "samples"}  # of each axis's X

# Keys a trial adds to its rows in `tune.report`, beside the row's own columns.
KIND = "kind"  # EVAL for a metric row (evaluation point), STEP for an optimizer step's stats
EVAL, STEP = "eval", "step"
TOTAL_STEPS = "total_steps"  # the run's last step
SWEEPS = "sweeps"  # the study sweeps the run belongs to, comma-joined
PREDICTED_FINAL = "predicted_final"  # the fitter's prediction of the final test loss
FORECAST = "forecast"  # FORECAST/<field>: the run's forecast (fitter.Forecast.to_result)
# Tune's loggers (trackers) plot against this key when it is set: the optimizer step. A
# step-0 evaluation has none (Tune's loggers skip a 0), so it shows at training iteration 1.
TRACKER_STEP = "timesteps_total"


def trial_result(
    kind: str, row: dict[str, Any], common: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """What a trial reports to Tune for a metric row (EVAL) or a step's stats (STEP)."""
    return {**row, **common, KIND: kind, TRACKER_STEP: row["step"], **extra}


class MetricsError(ValueError):
    """Metric rows that cannot be used: names the file, the column and what was expected."""


class LawKey(NamedTuple):
    """Which law a fit, prediction, planner answer or figure is about."""

    axis: str  # a key of AXES
    family: str


def x_column(axis: str) -> str:
    """The metrics column of resource axis `axis` ("compute" or "data")."""
    if axis not in AXES:
        raise MetricsError(f"x must be one of {sorted(AXES)}, got {axis!r}")
    return AXES[axis]


def benchmark_column(name: str) -> str:
    """The loss column of evaluation set `name`; its SE is this + "_se". The held-out set's
    is the row's test_loss."""
    return "test_loss" if name == HELD_OUT else f"test_loss_{name}"


def pass_at_column(k: int, name: str) -> str:
    """The unbiased pass@k column of evaluation set `name` (grpo.pass_k); its SE is this +
    "_se". The held-out set's is pass_at_<k>."""
    return f"pass_at_{k}" if name == HELD_OUT else f"pass_at_{k}_{name}"


def projected_end(x_now: float, step: int, total_steps: int) -> float:
    """X at a run's last step: compute and data both grow linearly in steps."""
    return x_now * total_steps / max(step, 1)


def column_type(name: str) -> type | None:
    """The contract's type of a column, None for a column it does not know."""
    if name in COLUMNS or name in OPTIONAL:
        return {**COLUMNS, **OPTIONAL}[name]
    if BENCHMARK.fullmatch(name) or TIMING.fullmatch(name) or PASS_AT.fullmatch(name):
        return float
    return None


def check_row(row: dict[str, Any], source: str) -> None:
    """A row must hold every required column, each known column of its type."""
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise MetricsError(f"{source}: metric row lacks column(s) {missing} (rayrl/DESIGN.md)")
    for name, value in row.items():
        tp = column_type(name)
        ok = tp is None or value is None or _is(value, tp)
        if not ok:
            raise MetricsError(
                f"{source}: column {name!r} expected {tp.__name__}, got {value!r} "
                f"({type(value).__name__})"
            )


def _is(value: Any, tp: type) -> bool:
    if tp is str:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer()
        )
    return isinstance(value, numbers.Real)


def check_columns(df: pd.DataFrame, source: str, required: tuple[str, ...] = REQUIRED) -> None:
    """A table must have the required columns, and numeric ones must be numeric."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MetricsError(
            f"{source}: missing column(s) {missing} (rayrl/DESIGN.md, the metric row); have {list(df.columns)}"
        )
    for name in df.columns:
        tp = column_type(name)
        if tp in (int, float) and len(df) and not pd.api.types.is_numeric_dtype(df[name]):
            raise MetricsError(f"{source}: column {name!r} expected numbers, got {df[name].dtype}")


def read_metrics(path: str | Path) -> pd.DataFrame:
    """METRICS.parquet or METRICS.csv, checked against the contract."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such metrics file")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path)
    else:
        raise MetricsError(f"{path}: expected a .parquet or .csv metrics file")
    check_columns(df, str(path))
    return df


def law_group(family: str, variant: str = DEFAULT_VARIANT) -> str:
    """The name a law is kept under: its family, and its variant where it is not the
    default (e.g. "base | grpo.clip_high=0.28"). Two groups never share a law."""
    return family if variant == DEFAULT_VARIANT else f"{family}{GROUP_SEP}{variant}"


def split_group(name: str) -> tuple[str, str]:
    """(family, variant) of a law group's name."""
    family, _, variant = name.partition(GROUP_SEP)
    return family, variant or DEFAULT_VARIANT


def law_groups(df: pd.DataFrame) -> pd.Series:
    """Each row's law group."""
    family = df["family"].astype(str)
    if "variant" not in df.columns:
        return family
    variant = df["variant"].fillna(DEFAULT_VARIANT).astype(str)
    # law_group, column-wise: the fitter groups every row on each refit.
    return family.where(variant == DEFAULT_VARIANT, family + GROUP_SEP + variant)


def families(df: pd.DataFrame) -> list[str]:
    """The law groups the rows hold (families, split by variant), sorted."""
    return sorted(law_groups(df).unique()) if len(df) else []


class MetricsLog:
    """Append-only from the run's point of view; rewritten atomically (write-temp, fsync,
    rename: rayrl/storage.py) so a crash or a full disk never truncates it. A row is in
    `rows`, and handed on, only once it is on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = read_metrics(self.path).to_dict("records")

    def append(self, row: dict[str, Any]) -> None:
        check_row(row, str(self.path))
        if any(r["step"] == row["step"] for r in self.rows):
            raise ValueError(f"{self.path}: step {row['step']} is already recorded")
        self._write([*self.rows, row])
        self.rows.append(row)

    def truncate_after(self, step: int) -> int:
        """Drop rows past a checkpoint, so resumed steps are recomputed, never duplicated."""
        kept = [r for r in self.rows if r["step"] <= step]
        if len(kept) != len(self.rows):
            self._write(kept)
        dropped, self.rows = len(self.rows) - len(kept), kept
        return dropped

    def _write(self, rows: list[dict[str, Any]]) -> None:
        replace_atomic(self.path, lambda tmp: pd.DataFrame(rows).to_parquet(tmp, index=False))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One record, fsynced; a failed write leaves no part of a line (rayrl/storage.py)."""
    append_line(path, json.dumps(record))
