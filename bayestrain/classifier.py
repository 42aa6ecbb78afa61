"""Sequence classification under the block-level conditions (DESIGN.md 2.2), with calibration
metrics and post-hoc temperature scaling.

:class:`TextClassifierModule` fine-tunes a classifier (``bayestrain.hf.HFSequenceClassifier``:
a pretrained encoder whose attention is bayestrain's registered softmax or Sinkhorn) with
``loss = cross-entropy + sum_k lambda_k V_k`` over the configured conditions in their modes
(``measure``, ``penalty``, ``lagrangian``, ``projection``), exactly as
:class:`bayestrain.module.BayesLitModule` does for predictors.  Validation and test report
``nll``, ``brier``, ``ece``, ``mce``, ``acc`` (``bayestrain.metrics.CalibrationMetrics``) and
``violation/<condition>`` for every configured condition plus, as monitors, prior consistency
(uniform prior over each text's tokens) and reversibility.

Temperature scaling (Guo et al., ICML 2017): one scalar ``T > 0`` dividing the logits, fitted
by L-BFGS on the validation split's NLL with the model in eval mode and frozen (its logits are
computed once under ``no_grad``; only ``log T`` has a gradient).  ``temperature_scaling=True``
makes the fitted ``T`` part of the module (a buffer, checkpointed in
``checkpoints/calibrated.ckpt`` after fit): its validation/test numbers and ``bayestrain-eval``
then use it.  Either way the end-of-run summary shows the test split with and without it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayestrain.conditions import Condition, ConditionInput, PriorConsistency, Reversibility, ViolationState
from bayestrain.metrics import CalibrationMetrics
from bayestrain.module import ConditionedModule

__all__ = ["TextClassifierModule", "fit_temperature"]


class _Mean(nn.Module):
    def __init__(self):
        super().__init__()
        from torchmetrics import MeanMetric

        self.m = MeanMetric()
        self.m.set_dtype(torch.float64)

    def update(self, value: Tensor, weight) -> None:
        self.m.update(value.detach().double(), weight)

    def compute(self) -> Tensor:
        return self.m.compute()

    def reset(self) -> None:
        self.m.reset()


class ClassifierEvaluator(nn.Module):
    """Calibration metrics and condition violations of one split, from logits and the
    attention trace of the same pass."""

    def __init__(self, num_classes: int, conditions: dict[str, Condition], n_bins: int = 15):
        super().__init__()
        self.conditions = dict(conditions)
        self.calibration = CalibrationMetrics(num_classes, n_bins=n_bins)
        self.violations = nn.ModuleDict({n: _Mean() for n in self.conditions})

    @torch.no_grad()
    def update(self, logp: Tensor, labels: Tensor, inp: ConditionInput | None) -> None:
        self.calibration.update(logp.float(), labels)
        for name, cond in self.conditions.items():
            st = _violation(cond, inp, training=False)
            self.violations[name].update(st.value, labels.shape[0])

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.calibration.compute())
        for name, m in self.violations.items():
            out[f"violation/{name}"] = m.compute()
        return out

    def reset(self) -> None:
        self.calibration.reset()
        self.calibration.reliability.reset()
        for m in self.violations.values():
            m.reset()


def _violation(cond: Condition, inp: ConditionInput, training: bool) -> ViolationState:
    if isinstance(cond, PriorConsistency) and cond.mode == "projection" and not len(inp.attn):
        # Sinkhorn on the fused path: only the residuals were recorded
        res = torch.stack(list(inp.attn.residuals)).mean()
        return ViolationState(violation=res, value=res.detach())
    return cond.violation(inp, training=training)


def _needs(conditions, training: bool) -> str | None:
    kinds = set()
    for c in conditions:
        if isinstance(c, PriorConsistency) and c.mode == "projection" and training:
            kinds.add("residuals")
        elif c.needs_attn:
            kinds.add(c.needs_attn)
    for k in ("weights", "marginals", "residuals"):
        if k in kinds:
            return k
    return None


@torch.enable_grad()
def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising ``NLL(softmax(logits / T), labels)`` (L-BFGS on
    ``log T`` in float64; ``logits`` are treated as constants)."""
    z, y = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


class TextClassifierModule(ConditionedModule):
    """Fine-tunes a sequence classifier under the block-level conditions.

    Args:
        model: a classifier ``model(input_ids, attention_mask, return_attn=None) -> logits``
            (``HFSequenceClassifier``) with ``num_labels`` and ``layout``.
        task: unused (real data); accepted so ``bayestrain.train.build`` can pass it.
        conditions: ``{name: Condition}``; ``reversibility`` in ``projection`` mode ties the
            encoder's W_Q and W_K (``bayestrain.hf.tie_qk_``) after every real optimizer step.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: optional ``(optimizer, total_steps) -> LRScheduler`` stepped every optimizer
            step (``bayestrain.schedules.warmup_decay``, a Hydra ``_partial_``).
        temperature_scaling: fit ``T`` on the validation split after training and use it.
        monitor_block_conditions: also measure prior consistency and reversibility at
            validation/test when they are not configured.
        name: the row name of this variant in the summary (default: from the conditions).
    """

    def __init__(self, model: nn.Module, task=None, conditions: dict[str, Condition] | None = None,
                 optimizer: Callable | None = None, scheduler: Callable | None = None, seed: int = 0,
                 n_bins: int = 15, temperature_scaling: bool = False,
                 monitor_block_conditions: bool = True, name: str | None = None):
        super().__init__()
        self.model, self.task = model, task
        self._setup_conditions(conditions, optimizer, scheduler, default_lr=5e-5)
        for cond in self.conditions.values():
            self._check(cond)
        self.seed = seed
        self.temperature_scaling = bool(temperature_scaling)
        self.register_buffer("log_temperature", torch.zeros((), dtype=torch.float64))
        self.register_buffer("temperature_fitted", torch.zeros((), dtype=torch.bool))
        self._train_kind = _needs(self.conditions.values(), training=True)

        causal = getattr(model, "layout", "bidirectional") == "causal"
        monitors = dict(self.conditions)
        if monitor_block_conditions:
            names = {c.name for c in monitors.values()}
            if "prior_consistency" not in names:
                monitors["prior_consistency"] = PriorConsistency(
                    prior="causal_uniform" if causal else "uniform", mode="measure")
            if "reversibility" not in names and not causal:
                monitors["reversibility"] = Reversibility(mode="measure")
        self.monitors = monitors
        self._eval_kind = _needs(monitors.values(), training=False)
        self.num_classes = int(model.num_labels)
        self.val_eval = ClassifierEvaluator(self.num_classes, monitors, n_bins)
        self.test_eval = ClassifierEvaluator(self.num_classes, monitors, n_bins)
        self.n_bins = n_bins
        self.last_reliability: dict | None = None
        self.variant = name or self._variant_name()

    # -- conditions ------------------------------------------------------------------
    def _check(self, cond: Condition) -> None:
        if isinstance(cond, Reversibility) and cond.mode == "projection":
            from bayestrain.hf import check_tying

            encoder = getattr(self.model, "encoder", self.model)
            check_tying(encoder)  # refuses causal models and models without q/k projections
            return
        cond.check(self.model, self.task)

    def _variant_name(self) -> str:
        active = [f"{n}: {c.mode}" for n, c in self.conditions.items() if c.mode != "measure"]
        return "constrained (" + ", ".join(active) + ")" if active else "unconstrained"

    def violation(self, cond: Condition, inp: ConditionInput) -> ViolationState:
        return _violation(cond, inp, training=True)

    def project_(self, cond: Condition) -> None:
        if isinstance(cond, Reversibility):  # a Hugging Face encoder: tie its own q/k projections
            from bayestrain.hf import tie_qk_

            tie_qk_(getattr(self.model, "encoder", self.model))
        else:
            cond.project_(self.model)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    # -- forward ---------------------------------------------------------------------
    def _forward(self, batch: dict, kind: str | None):
        out = self.model(batch["input_ids"], batch.get("attention_mask"), return_attn=kind)
        logits, trace = (out, None) if kind is None else out
        return logits, trace

    def _logp(self, logits: Tensor, temperature: float | Tensor | None = None) -> Tensor:
        z = logits.float()
        if temperature is None:
            temperature = self.log_temperature.exp() if self.temperature_scaling else None
        if temperature is not None:
            z = z / torch.as_tensor(temperature, dtype=z.dtype, device=z.device)
        return torch.log_softmax(z, -1)

    # -- training --------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits, trace = self._forward(batch, self._train_kind)
        labels = batch["labels"]
        loss_task = F.cross_entropy(logits.float(), labels)
        inp = ConditionInput(self.model, batch["input_ids"], attn=trace)
        bs = labels.shape[0]
        total = loss_task + self.condition_terms(inp, self.conditions, batch_size=bs)
        if self._log_due():
            self._log_lr()
        self.log("train/loss_task", loss_task, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/loss_total", total, on_step=True, on_epoch=True, batch_size=bs)
        return total

    # -- evaluation ------------------------------------------------------------------
    def _eval_step(self, batch: dict, ev: ClassifierEvaluator, temperature=None) -> None:
        logits, trace = self._forward(batch, self._eval_kind)
        inp = ConditionInput(self.model, batch["input_ids"], attn=trace)
        ev.update(self._logp(logits, temperature), batch["labels"], inp)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_eval)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_eval)

    def _log_eval(self, stage: str, ev: ClassifierEvaluator) -> None:
        values = ev.compute()
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items()})
        if self.temperature_scaling and bool(self.temperature_fitted):
            self.log(f"{stage}/temperature", float(self.temperature))
        self.last_reliability = ev.calibration.reliability.compute()
        ev.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_eval)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_eval)

    # -- temperature scaling -----------------------------------------------------------
    @torch.no_grad()
    def collect_logits(self, loader, max_batches: int | None = None) -> tuple[Tensor, Tensor]:
        """Logits and labels of a split, model in eval mode, no gradients."""
        was = self.model.training
        self.model.eval()
        zs, ys = [], []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            zs.append(self.model(batch["input_ids"], batch["attention_mask"]).float())
            ys.append(batch["labels"])
        self.model.train(was)
        return torch.cat(zs), torch.cat(ys)

    def fit_temperature_(self, val_loader, max_batches: int | None = None) -> float:
        """Fit ``T`` on the validation split (eval mode, gradients on ``T`` only) and keep it."""
        z, y = self.collect_logits(val_loader, max_batches)
        t = fit_temperature(z, y)
        self.log_temperature.fill_(math.log(t))
        self.temperature_fitted.fill_(True)
        return t

    def on_fit_end(self) -> None:
        if not self.temperature_scaling or self.trainer.datamodule is None:
            return
        t = self.fit_temperature_(self.trainer.datamodule.val_dataloader())
        cb = self.trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            # a full checkpoint: weights-only ones skip the callbacks, so they lack the stored config
            self.trainer.save_checkpoint(Path(cb.dirpath) / "calibrated.ckpt")
        print(f"temperature scaling: T = {t:.4f} (fitted on the validation split)")

    # -- whole-split evaluation (summary, bayestrain-eval) ------------------------------
    @torch.no_grad()
    def evaluate_loader(self, loader, temperature: float | None = None, max_batches: int | None = None):
        """``(metrics, reliability bins)`` of a whole split, model in eval mode."""
        was = self.model.training
        self.model.eval()
        ev = ClassifierEvaluator(self.num_classes, self.monitors, self.n_bins).to(self.device)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            self._eval_step(batch, ev, temperature=temperature if temperature is not None else None)
        self.model.train(was)
        bins = ev.calibration.reliability.compute()
        return {k: float(v) for k, v in ev.compute().items()}, bins

    def evaluate_split(self, datamodule, split: str = "test", max_batches: int | None = None):
        """For ``bayestrain-eval``: ``({row name: metrics}, reliability bins)`` of ``split``,
        with the fitted temperature when ``temperature_scaling`` (refitted on the validation
        split if the checkpoint predates the fit)."""
        if self.temperature_scaling and not bool(self.temperature_fitted):
            self.fit_temperature_(datamodule.val_dataloader())
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        metrics, bins = self.evaluate_loader(loader, max_batches=max_batches)
        name = self.variant + (f" + temperature scaling (T={self.temperature:.3f})" if self.temperature_scaling else "")
        return {name: metrics}, bins

    def summary_rows(self, datamodule) -> tuple[str, dict[str, dict]]:
        """End-of-run table on the **test** split: this variant as trained (``T = 1``) and with
        temperature scaling fitted on the validation split."""
        if self.temperature_scaling and bool(self.temperature_fitted):
            t = self.temperature
        else:
            z, y = self.collect_logits(datamodule.val_dataloader())
            t = fit_temperature(z, y)
        loader = datamodule.test_dataloader()
        raw, _ = self.evaluate_loader(loader, temperature=1.0)
        scaled, _ = self.evaluate_loader(loader, temperature=t)
        rows = {self.variant: raw, f"{self.variant} + temperature scaling (T={t:.3f})": scaled}
        title = f"{type(datamodule).__name__}: test split ({len(datamodule.texts['test'])} texts)" \
            if hasattr(datamodule, "texts") else "test split"
        return title, rows
