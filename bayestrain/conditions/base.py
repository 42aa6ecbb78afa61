"""Condition objects (in the spirit of cooper's constraints).

Each violation function returns a :class:`ViolationState`: the differentiable quantity a
penalty or a Lagrangian uses, and the detached value that is logged.  Condition objects carry
a *mode* (``measure``, ``penalty``, ``lagrangian``, ``projection``), check at construction of
the training module that they apply to its task and model (``check``), and compute their
violation from what the main pass already produced (``logp``, the causal key/value cache, the
attention trace).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("measure", "penalty", "lagrangian", "projection")


@dataclass
class ViolationState:
    violation: Tensor  # differentiable scalar: what penalty / lagrangian modes use
    value: Tensor  # detached scalar: the logged value (DESIGN's definition)
    extras: dict[str, Tensor] = field(default_factory=dict)  # other logged values (e.g. tv)


@dataclass
class ConditionInput:
    """What one training/evaluation pass offers the conditions."""

    model: torch.nn.Module
    x: Tensor
    logp: Tensor | None = None  # (B, T, V) of x, all positions (causal models)
    cache: list | None = None  # causal per-layer (k, v) of the same pass
    attn: object | None = None  # AttentionTrace of the same pass
    generator: torch.Generator | None = None


class Condition:
    """Base class.  ``mode``: ``measure`` (log only), ``penalty`` (``weight`` times the
    violation, linearly warmed up over ``warmup_steps``), ``lagrangian`` (constraint
    ``V <= eps``, multiplier updated by ``dual_lr``), ``projection`` (where a condition has
    one).  Subclasses define ``name``, ``violation``, and ``check``."""

    name = "condition"
    needs_attn: str | None = None  # None | "marginals" | "weights"
    needs_cache = False
    projection_supported = False

    def __init__(self, mode: str = "penalty", weight: float = 1.0, warmup_steps: int = 0,
                 eps: float = 0.0, dual_lr: float = 0.1):
        if mode not in MODES:
            raise ValueError(f"{self.name}: mode={mode!r} is not one of {list(MODES)}")
        if mode == "projection" and not self.projection_supported:
            raise ValueError(
                f"{self.name}: mode='projection' is not available for this condition; use "
                "'measure', 'penalty' or 'lagrangian' (projection exists for reversibility, and for "
                "prior_consistency with attention=sinkhorn)"
            )
        if weight < 0 or warmup_steps < 0 or eps < 0 or dual_lr <= 0:
            raise ValueError(
                f"{self.name}: need weight >= 0, warmup_steps >= 0, eps >= 0 and dual_lr > 0; got "
                f"weight={weight}, warmup_steps={warmup_steps}, eps={eps}, dual_lr={dual_lr}"
            )
        self.mode, self.weight, self.warmup_steps = mode, float(weight), int(warmup_steps)
        self.eps, self.dual_lr = float(eps), float(dual_lr)

    def weight_at(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)

    def check(self, model, task) -> None:
        """Refuse (ValueError) a task or model this condition does not apply to."""

    def violation(self, inp: ConditionInput, training: bool) -> ViolationState:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, weight={self.weight})"


