"""Learning-rate schedules, per optimizer step: linear warm-up, then a decay.

``conf/scheduler/*.yaml`` hold them as Hydra partials; the training modules call them with
the optimizer and the run's total number of optimizer steps (Lightning's
``estimated_stepping_batches``), so one schedule fits any ``max_steps`` or ``max_epochs``.
"""
from __future__ import annotations

import math
import warnings

import torch

DECAYS = ("cosine", "linear", "constant")


def warmup_decay(optimizer: torch.optim.Optimizer, total_steps: float, warmup_steps: int = 0,
                 decay: str = "cosine", final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr(step) = base_lr * f(step)``: ``f`` rises linearly from ``1/warmup_steps`` to 1 over
    ``warmup_steps``, then falls from 1 to ``final_ratio`` at ``total_steps`` (``cosine`` or
    ``linear``) or stays at 1 (``constant``)."""
    if decay not in DECAYS:
        raise ValueError(f"scheduler decay={decay!r} is not one of {list(DECAYS)}")
    if warmup_steps < 0:
        raise ValueError(f"scheduler warmup_steps={warmup_steps} must be >= 0 (0: no warm-up)")
    if total_steps == math.inf:
        raise ValueError(
            "scheduler: the run has no finite length (trainer.max_steps=-1 and max_epochs=-1), so a "
            "decaying schedule has no end; set trainer.max_steps (or max_epochs), or use scheduler=constant"
        )
    if total_steps < 1:
        raise ValueError(
            f"scheduler: total_steps={total_steps}, so the run has no optimizer step to schedule; check "
            "trainer.max_steps, limit_train_batches and the training data"
        )
    if warmup_steps >= total_steps:
        warnings.warn(
            f"scheduler warmup_steps={warmup_steps} >= the run's {int(total_steps)} optimizer steps: the "
            "learning rate never reaches its configured value; lower scheduler.warmup_steps",
            stacklevel=2,
        )
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"scheduler final_ratio={final_ratio} must be in [0, 1] (a fraction of the base lr)")
    span = max(1, int(total_steps) - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac
        return final_ratio + (1.0 - final_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
