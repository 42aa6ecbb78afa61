"""Training modes inside the real LightningModule and Trainer: the Lagrangian's dual ascent on
a toy problem with a known answer, and post-step hooks that run once per *real* optimizer
update (not on AMP-skipped steps, once per accumulation window)."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from bayestrain.conditions import Condition, ViolationState
from bayestrain.model import ModelOutput
from bayestrain.module import BayesLitModule


class ToyPredictor(nn.Module):
    """loss_task = (w - target)^2 through the module's NLL: logp = -(w - target)^2 everywhere."""

    layout, vocab_size = "causal", 2

    def __init__(self, target: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))
        self.target = target

    def run(self, x, return_attn=None, return_cache=False, cut=None):
        logp = (-(self.w - self.target) ** 2).expand(*x.shape, 2)
        return ModelOutput(logp)

    def forward(self, x, return_attn=None):
        return self.run(x).logp


class UpperBound(Condition):
    """V = w - 1 (constraint w <= 1 when eps = 0)."""

    name = "bound"
    projection_supported = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.projections = 0

    def violation(self, inp, training):
        v = inp.model.w - 1.0
        return ViolationState(violation=v, value=v.detach())

    def project_(self, model):
        self.projections += 1


class Stream(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(2, 3, dtype=torch.long)


def fit(module, steps, **trainer_kw):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu", **trainer_kw)
    trainer.fit(module, DataLoader(Stream(), batch_size=None))
    return trainer


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_lagrangian_multiplier_rises_then_returns_to_zero():
    """min (w-2)^2 s.t. w <= 1: KKT gives w* = 1, lambda* = 2(2 - w*) = 2."""
    model = ToyPredictor(target=2.0)
    cond = UpperBound(mode="lagrangian", dual_lr=0.2)
    module = BayesLitModule(model, None, {"bound": cond}, optimizer=sgd(0.05), monitor_sequence_conditions=False)
    lams = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            lams.append(float(pl_module.multiplier("bound")))

    fit(module, 600, callbacks=[Record()])
    assert lams[0] > 0 and lams[5] > lams[0], "the multiplier rises while w > 1"
    assert abs(model.w.item() - 1.0) < 0.02 and abs(lams[-1] - 2.0) < 0.05, (model.w.item(), lams[-1])

    model.target = 0.0  # now the constraint is slack at the optimum w = 0
    fit(module, 1200, callbacks=[Record()])
    assert model.w.item() < 0.5
    assert lams[-1] == 0.0, "the multiplier returns to exactly zero (projected dual ascent)"


def test_post_step_hooks_skip_amp_skipped_steps():
    model = ToyPredictor(target=2.0)
    cond = UpperBound(mode="projection")
    module = BayesLitModule(model, None, {"bound": cond}, optimizer=sgd(0.01), monitor_sequence_conditions=False)
    calls = []

    def poison_first(grad):  # the first backward produces an inf gradient
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 1 else grad

    model.w.register_hook(poison_first)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fit(module, 3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    # batch 0 had an inf gradient: the scaler skipped that update (scale halved) and the
    # projection skipped with it; the two real updates that followed each projected once
    assert scaler.get_scale() == 2.0**7
    assert len(calls) == 3 and cond.projections == 2, (len(calls), cond.projections)


def test_post_step_hooks_run_once_per_accumulated_step():
    cond = UpperBound(mode="projection")
    module = BayesLitModule(ToyPredictor(2.0), None, {"bound": cond}, optimizer=sgd(0.01),
                            monitor_sequence_conditions=False)
    seen = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(cond.projections)

    fit(module, 3, accumulate_grad_batches=4, callbacks=[Count()])
    assert len(seen) == 12
    assert seen == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3], seen


def test_projection_refused_where_a_condition_has_none():
    from bayestrain.conditions import Martingale

    with pytest.raises(ValueError, match="projection"):
        Martingale(mode="projection")
