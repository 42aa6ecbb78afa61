"""Lightning module: task loss plus the Bayes conditions, in their modes.

``loss = nll + sum_k lambda_k V_k`` where ``lambda_k`` is a constant or warmed-up weight
(``penalty``) or a Lagrange multiplier updated by projected dual ascent after each real
optimizer step (``lagrangian``).  ``measure`` conditions are only logged; ``projection``
conditions mutate the model in place after each real optimizer step.
"""
from __future__ import annotations

from typing import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from bayestrain.conditions import Condition, ConditionInput, Exchangeability, Martingale
from bayestrain.metrics import BayesGapBits, CalibrationMetrics
from bayestrain.tasks import WindTunnel


def _needs_attn(conditions) -> str | None:
    kinds = {c.needs_attn for c in conditions}
    return "weights" if "weights" in kinds else "marginals" if "marginals" in kinds else None


class Evaluator(nn.Module):
    """Everything a validation/test pass reports for one predictor: calibration (nll, brier,
    ece, mce, acc), the Bayes gap against the task's exact posterior predictive (wind tunnels),
    each condition's violation under its full evaluation definition, and reliability bins.
    Used by the training module, by ``bayestrain-eval`` and for the exact-predictor baseline,
    so every number in a table is computed by the same code."""

    def __init__(self, vocab_size: int, task=None, conditions: dict[str, Condition] | None = None,
                 n_bins: int = 15):
        super().__init__()
        self.task = task
        self.conditions = dict(conditions or {})
        self.calibration = CalibrationMetrics(vocab_size, n_bins=n_bins)  # with .reliability bins
        self.gap = BayesGapBits()
        self.violations = nn.ModuleDict({n: _Mean() for n in self.conditions})

    @torch.no_grad()
    def update(self, predictor, x: Tensor, logp: Tensor | None = None, generator=None) -> None:
        if logp is None:
            logp = predictor(x)
        flat, target = logp.flatten(0, 1), x.flatten()
        self.calibration.update(flat, target)
        if self.task is not None and hasattr(self.task, "posterior_predictive"):
            self.gap.update(logp, self.task.posterior_predictive(x).to(logp.device))
        for name, cond in self.conditions.items():
            st = cond.violation(ConditionInput(predictor, x, logp=logp, generator=generator), training=False)
            self.violations[name].update(st.value, x.shape[0])

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.calibration.compute())
        if self.gap.update_count:
            out["bayes_gap_bits"] = self.gap.compute()
        for name, m in self.violations.items():
            out[f"violation/{name}"] = m.compute()
        return out

    def reset(self) -> None:
        self.calibration.reset()
        self.calibration.reliability.reset()
        self.gap.reset()
        for m in self.violations.values():
            m.reset()


class _Mean(nn.Module):
    """Weighted running mean in float64 (a tiny MeanMetric that syncs through torchmetrics)."""

    def __init__(self):
        super().__init__()
        from torchmetrics import MeanMetric

        self.m = MeanMetric()
        self.m.set_dtype(torch.float64)

    def update(self, value, weight) -> None:
        self.m.update(value.double(), weight)

    def compute(self) -> Tensor:
        return self.m.compute()

    def reset(self) -> None:
        self.m.reset()


class ConditionedModule(pl.LightningModule):
    """What every bayestrain training module shares: the conditions' terms in the loss (by
    mode), Lagrange multipliers as buffers (checkpointed, restored, identical on every rank),
    dual ascent and projections after every *real* optimizer update, the optimizer and its
    learning-rate schedule.  Subclasses call :meth:`_setup_conditions` and
    :meth:`condition_terms`, and may override :meth:`violation` and :meth:`project_`."""

    def _setup_conditions(self, conditions, optimizer: Callable | None, scheduler: Callable | None,
                          default_lr: float) -> None:
        self.conditions: dict[str, Condition] = dict(conditions or {})
        for cond in self.conditions.values():
            if not isinstance(cond, Condition):
                raise TypeError(f"conditions must be Condition objects, got {type(cond).__name__}")
        self.optimizer_factory = optimizer or (lambda p: torch.optim.AdamW(p, lr=default_lr))
        self.scheduler_factory = scheduler
        for name, cond in self.conditions.items():
            if cond.mode == "lagrangian":  # module state: checkpointed, restored, DDP-broadcast
                self.register_buffer(f"lambda_{name}", torch.zeros((), dtype=torch.float64))
        self._pending: dict[str, list[Tensor]] = {}

    def multiplier(self, name: str) -> Tensor:
        return getattr(self, f"lambda_{name}")

    def violation(self, cond: Condition, inp: ConditionInput):
        return cond.violation(inp, training=True)

    def condition_terms(self, inp: ConditionInput, conditions: dict[str, Condition], batch_size: int | None = None) -> Tensor | float:
        """``sum_k lambda_k V_k`` over the penalty and Lagrangian conditions; every condition's
        training value is logged (``train/violation/<name>``).  Measure and projection
        conditions are evaluated without autograd: they never enter the loss."""
        total = 0.0
        for name, cond in conditions.items():
            if cond.mode in ("measure", "projection"):
                with torch.no_grad():
                    state = self.violation(cond, inp)
            else:
                state = self.violation(cond, inp)
            if cond.mode == "penalty":
                total = total + cond.weight_at(self.global_step) * state.violation
            elif cond.mode == "lagrangian":
                lam = self.multiplier(name)
                total = total + lam.to(state.violation.dtype) * state.violation
                self._pending.setdefault(name, []).append(state.violation.detach())
                self.log(f"train/lambda/{name}", lam.float(), on_step=True, batch_size=batch_size)
            self.log(f"train/violation/{name}", state.value.float(), on_step=True, on_epoch=True, batch_size=batch_size)
            for key, val in state.extras.items():
                self.log(f"train/{key}/{name}", val.float(), on_step=True, batch_size=batch_size)
        return total

    def _log_due(self) -> bool:
        """Whether this step's on_step values reach the logger (and the first step)."""
        every = max(1, int(getattr(self._trainer, "log_every_n_steps", 1) or 1))
        return self.global_step == 0 or (self.global_step + 1) % every == 0

    def _log_lr(self) -> None:
        if self._trainer is not None and self.trainer.optimizers:  # a Python float: no host sync
            self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # Lightning calls this once per *accumulated* step.  Under fp16 AMP the scaler may skip
        # the update (inf/NaN gradients); projections and dual updates must skip with it.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None  # host sync only under fp16
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if scaler is not None and scaler.get_scale() < scale:
            self._pending.clear()
            return
        self.after_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """What follows every real optimizer update: dual ascent and projections."""
        for name, cond in self.conditions.items():
            if cond.mode == "lagrangian" and self._pending.get(name):
                v = torch.stack(self._pending[name]).mean().double()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(v)  # identical multipliers on every rank
                    v = v / torch.distributed.get_world_size()
                lam = self.multiplier(name)
                lam.copy_((lam + cond.dual_lr * (v - cond.eps)).clamp_min(0.0))
            elif cond.mode == "projection":
                self.project_(cond)
        self._pending.clear()

    def project_(self, cond: Condition) -> None:
        cond.project_(self.model)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming: Lightning restores the schedule from checkpoint["lr_schedulers"]; a checkpoint
        # written without one would silently restart it (warm-up included) in the middle of the run
        if self.scheduler_factory is not None and "optimizer_states" in checkpoint and not checkpoint.get("lr_schedulers"):
            raise ValueError(
                f"this checkpoint (global_step {checkpoint.get('global_step')}) was saved by a run without a "
                "learning-rate scheduler, so resuming it under one would restart the schedule at step 0; "
                "resume with scheduler=none (the run's own setting), or start a new run"
            )


class BayesLitModule(ConditionedModule):
    """Trains a predictor under Bayes conditions.

    Args:
        model: a predictor (``BayesTransformer``).
        task: the wind tunnel (for exchangeability checks and the exact Bayes gap).
        conditions: ``{name: Condition}`` active in training.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: optional ``(optimizer, total_steps) -> LRScheduler`` stepped every optimizer
            step (``bayestrain.schedules.warmup_decay``, a Hydra ``_partial_``).
        monitor_sequence_conditions: also *measure* exchangeability and martingale at
            validation when the task is exchangeable and they are not already configured.
        seed: seeds the per-step generator of the conditions' permutations and positions, so
            a resumed run draws the same ones.
    """

    def __init__(
        self,
        model: nn.Module,
        task: WindTunnel | None,
        conditions: dict[str, Condition] | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        monitor_sequence_conditions: bool = True,
        n_bins: int = 15,
        seed: int = 0,
    ):
        super().__init__()
        self.model, self.task = model, task
        self._setup_conditions(conditions, optimizer, scheduler, default_lr=1e-3)
        for cond in self.conditions.values():
            cond.check(model, task)  # refuse before any training step
        task_vocab = getattr(task, "vocab_size", None)
        model_vocab = getattr(model, "vocab_size", None)
        if task_vocab is not None and model_vocab is not None and task_vocab != model_vocab:
            raise ValueError(
                f"model.vocab_size={model_vocab} does not match the task's vocabulary "
                f"({type(task).__name__}: vocab_size={task_vocab}); leave model.vocab_size unset "
                "(it is taken from the task) or make them equal"
            )
        self.seed = seed
        self._needs_attn = _needs_attn(self.conditions.values())
        self._needs_cache = any(c.needs_cache for c in self.conditions.values())

        monitors = dict(self.conditions)
        if monitor_sequence_conditions and getattr(task, "exchangeable", False):
            names = {c.name for c in monitors.values()}
            if "exchangeability" not in names:
                monitors["exchangeability"] = Exchangeability(mode="measure")
            if not names & {"martingale", "martingale_l2"}:
                monitors["martingale"] = Martingale(mode="measure")
        vocab = model_vocab or task_vocab
        self.val_eval = Evaluator(vocab, task, monitors, n_bins)
        self.test_eval = Evaluator(vocab, task, monitors, n_bins)
        self.last_reliability: dict | None = None

    # -- helpers -------------------------------------------------------------------------
    def _generator(self, stage_offset: int = 0) -> torch.Generator:
        """Per-step generator: a resumed run draws the same permutations and positions."""
        rank = self.global_rank if self._trainer is not None else 0
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.global_step * 7919 + rank * 104_729 + stage_offset)
        return g

    # -- training ------------------------------------------------------------------------
    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        gen = self._generator()
        # Projection-mode conditions are enforced by their projection and never enter the loss:
        # their violation is a diagnostic, evaluated (without autograd) only on the steps whose
        # on_step values reach the logger (every log_every_n_steps, as Lightning decides) and on
        # the first step.  The main pass asks for attention read-outs / the key-value cache only
        # when a condition evaluated this step needs them.
        conditions = self.conditions
        needs_attn, needs_cache = self._needs_attn, self._needs_cache
        log_due = self._log_due()
        if not log_due and any(c.mode == "projection" for c in conditions.values()):
            conditions = {n: c for n, c in conditions.items() if c.mode != "projection"}
            needs_attn = _needs_attn(conditions.values())
            needs_cache = any(c.needs_cache for c in conditions.values())
        causal = getattr(self.model, "layout", "causal") == "causal"
        if causal:
            out = self.model.run(x, return_attn=needs_attn, return_cache=needs_cache)
            logp = out.logp  # (B, T, V)
            loss_task = -logp.gather(-1, x[..., None]).mean()
        else:  # set / bidirectional: one context length per sequence
            cut = torch.randint(0, x.shape[1], (x.shape[0],), device=x.device, generator=gen)
            out = self.model.run(x, cut=cut, return_attn=needs_attn)
            logp = None  # sequence conditions recompute the full predictive themselves
            loss_task = -out.logp[:, 0].gather(-1, x.gather(1, cut[:, None])).mean()

        if out.residual is not None:  # Sinkhorn: how far the last iteration is from the prior
            self.log("train/sinkhorn_residual", out.residual.detach(), on_step=True, on_epoch=True)
        inp = ConditionInput(self.model, x, logp=logp, cache=out.cache, attn=out.attn, generator=gen)
        total = loss_task + self.condition_terms(inp, conditions)
        if log_due:
            self._log_lr()
        self.log("train/loss_task", loss_task, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/loss_total", total, on_step=True, on_epoch=True)
        return total

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if hasattr(self.model, "clamp_mixing_"):
            self.model.clamp_mixing_()

    # -- evaluation ----------------------------------------------------------------------
    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        self.val_eval.update(self.model, x, generator=self._generator(stage_offset=batch_idx + 1))

    def test_step(self, x: Tensor, batch_idx: int) -> None:
        self.test_eval.update(self.model, x, generator=self._generator(stage_offset=batch_idx + 1))

    def _log_eval(self, stage: str, ev: Evaluator) -> None:
        values = ev.compute()
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items()}, prog_bar=False)
        self.last_reliability = ev.calibration.reliability.compute()
        ev.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_eval)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_eval)

    # the global RNG (dropout) travels with the checkpoint: a resumed run draws the same masks
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bayestrain_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "bayestrain_rng" in checkpoint:
            torch.set_rng_state(checkpoint["bayestrain_rng"]["torch"])

    def summary_rows(self, datamodule) -> tuple[str, dict[str, dict]]:
        """End-of-run table: the model beside the exact Bayes predictor on the validation set."""
        from bayestrain.summary import compare_with_exact

        return f"{type(self.task).__name__}: validation set", compare_with_exact(self, datamodule, seed=self.seed)
