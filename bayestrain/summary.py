"""The model beside the exact Bayes predictor, on the same validation sequences."""
from __future__ import annotations

import torch

from bayestrain.module import Evaluator
from bayestrain.tasks import BayesPredictor


@torch.no_grad()
def compare_with_exact(module, datamodule, seed: int = 0, max_batches: int | None = None) -> dict[str, dict]:
    """``{"model": metrics, "exact Bayes": metrics}`` on the validation loader, each computed by
    the same :class:`Evaluator` (same conditions, same permutations)."""
    model, task = module.model, module.task
    was_training = model.training
    model.eval()
    conditions = module.val_eval.conditions
    rows = {}
    # the exact predictor has no attention: it is measured on the sequence-level conditions only
    seq_conditions = {n: c for n, c in conditions.items() if c.needs_attn is None}
    for name, predictor, conds in [("model", model, conditions), ("exact Bayes", BayesPredictor(task), seq_conditions)]:
        ev = Evaluator(task.vocab_size, task, conds).to(module.device)
        for i, x in enumerate(datamodule.val_dataloader()):
            if max_batches is not None and i >= max_batches:
                break
            g = torch.Generator(device=module.device).manual_seed(seed + i)
            ev.update(predictor, x.to(module.device), generator=g)
        rows[name] = {k: float(v) for k, v in ev.compute().items()}
    model.train(was_training)
    return rows
