"""The trial record: what distinguishes one run of a study from another.

`Config.trials()` makes them, Tune carries them in its param space (`to_params` /
`from_params`), and the run, its run id, the dry-run and the live table read them by
attribute. A trial of `rayrl train` is the same record, made from the config's own values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Trial:
    model: str
    family: str
    rollout_n: int
    reuse_factor: int  # tau
    seed: int
    sweeps: tuple[str, ...] = field(default=(), compare=False)  # the study sweeps it belongs to

    @property
    def run_id(self) -> str:
        return f"{self.model}-{self.family}-n{self.rollout_n}-tau{self.reuse_factor}-s{self.seed}"

    @property
    def key(self) -> tuple:
        """What makes two trials the same run (a run in several sweeps is one trial)."""
        return (self.model, self.family, self.rollout_n, self.reuse_factor, self.seed)

    def to_params(self) -> dict[str, Any]:
        """Plain values for Tune's param space (and its live table's trial/<field> columns)."""
        return {**dataclasses.asdict(self), "sweeps": list(self.sweeps)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Trial:
        return cls(**{**params, "sweeps": tuple(params.get("sweeps", ()))})


# The live table's parameter columns, by field.
COLUMNS = ("model", "family", "rollout_n", "reuse_factor", "seed")
