"""The Bayes conditions (DESIGN.md section 2): functions returning a ViolationState, and
condition objects with a mode."""
from bayestrain.conditions.base import MODES, Condition, ConditionInput, ViolationState
from bayestrain.conditions.block import (
    PRIOR_NAMES,
    STATIONARY_TELEPORT,
    PriorConsistency,
    Reversibility,
    causal_uniform_prior,
    prior_consistency_violation,
    reversibility_violation,
    stationary_law,
    tie_fused_qkv_,
    tie_qk_,
)
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
    "PRIOR_NAMES",
    "STATIONARY_TELEPORT",
    "PriorConsistency",
    "Reversibility",
    "causal_uniform_prior",
    "prior_consistency_violation",
    "reversibility_violation",
    "stationary_law",
    "tie_fused_qkv_",
    "tie_qk_",
]
