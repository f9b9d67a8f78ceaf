"""Guru-format rows: loading, curriculum, held-out split, reuse schedule, synthetic task."""

from rayrl.data.curriculum import curriculum_order, pass_rate
from rayrl.data.loading import DataError, LoadResult, load_rows
from rayrl.data.reuse import reuse_schedule
from rayrl.data.rows import Malformed
from rayrl.data.split import held_out_split
from rayrl.data.synthetic import synthetic_task
from rayrl.data.task import Task, load_task
from rayrl.data.templates import apply_template, render_prompt

__all__ = [
    "DataError",
    "LoadResult",
    "Malformed",
    "Task",
    "apply_template",
    "curriculum_order",
    "held_out_split",
    "load_rows",
    "load_task",
    "pass_rate",
    "render_prompt",
    "reuse_schedule",
    "synthetic_task",
]
