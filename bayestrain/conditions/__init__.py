"""The Bayes conditions (DESIGN.md section 2): functions returning a ViolationState, and
condition objects with a mode."""
from bayestrain.conditions.base import MODES, Condition, ConditionInput, ViolationState
from bayestrain.conditions.sequence import (
    Exchangeability,
    Martingale,
    exchangeability_violation,
    joint_logp,
    martingale_violation,
)

__all__ = [
    "MODES",
    "Condition",
    "ConditionInput",
    "ViolationState",
    "Exchangeability",
    "Martingale",
    "exchangeability_violation",
    "joint_logp",
    "martingale_violation",
]
