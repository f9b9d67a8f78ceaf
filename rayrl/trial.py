"""The trial record: what distinguishes one run of a study from another.

`Config.trials()` makes them, Tune carries them in its param space (`to_params` /
`from_params`), and the run, its run id, the dry-run and the live table read them by
attribute. A trial of `rayrl train` is the same record, made from the config's own values.
A trial of a searched study also carries its variant: the config overrides it runs with
(rayrl.search).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rayrl.search import DEFAULT, label


@dataclass(frozen=True)
class Trial:
    model: str
    family: str
    rollout_n: int
    reuse_factor: int  # tau
    seed: int
    sweeps: tuple[str, ...] = field(default=(), compare=False)  # the study sweeps it belongs to
    # The variant: dotted config key -> value, sorted by key; () is the default variant.
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def variant(self) -> str:
        return label(dict(self.overrides))

    @property
    def run_id(self) -> str:
        base = f"{self.model}-{self.family}-n{self.rollout_n}-tau{self.reuse_factor}-s{self.seed}"
        return base if self.variant == DEFAULT else f"{base}-{self.variant}"

    def to_params(self) -> dict[str, Any]:
        """Plain values for Tune's param space (and its live table's trial/<field> columns);
        the overrides go to the trackers as parameters."""
        return {
            **dataclasses.asdict(self),
            "sweeps": list(self.sweeps),
            "overrides": dict(self.overrides),
            "variant": self.variant,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Trial:
        params = {k: v for k, v in params.items() if k != "variant"}
        return cls(
            **{
                **params,
                "sweeps": tuple(params.get("sweeps", ())),
                "overrides": tuple(sorted(dict(params.get("overrides", {})).items())),
            }
        )


# The live table's parameter columns, by field.
COLUMNS = ("model", "family", "rollout_n", "reuse_factor", "seed", "variant")
