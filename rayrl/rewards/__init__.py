"""Reward verification: math, stem, logic, code and the synthetic task; RewardPool in rayrl.rewards.pool."""

from rayrl.rewards.dispatch import score, score_detailed, verifier_for
from rayrl.rewards.verdict import Verdict

__all__ = ["Verdict", "score", "score_detailed", "verifier_for"]
