"""What the ladder records about one built model; light, so that a cache hit imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

ENTRY_FILE = "ladder_entry.json"  # beside the weights in each model directory


@dataclass
class LadderEntry:
    name: str
    path: str
    total_params: int
    non_embedding_params: int
    pass_at_1: float  # held-out, at the evaluation temperature
    pretrain_steps: int = 0
    build_seconds: float = 0.0
