"""Calibration and Bayes-gap metrics (DESIGN.md section 5).

Inputs
------
Every metric takes the predictor's log-probabilities ``logp: Tensor[..., V]`` (any float
dtype, bf16/fp16 included) and integer targets ``target: LongTensor[...]`` with the same
leading shape; callers normally flatten ``[B, T, V] -> [B*T, V]`` and drop padded positions
first. Where a ``mask`` is accepted it has the leading shape of ``target`` and is **True at
the positions to include** (valid positions) -- the opposite of ``key_padding_mask``.
Masked-out positions may hold anything (garbage targets, ``-inf``/NaN log-probabilities):
they are never indexed with and never reach a sum.

Precision
---------
Sums are accumulated in float64 whatever the model's precision: NLL, Brier and the Bayes gap
are computed from ``logp.double()``; metric states are float64 and stay float64 even when a
Lightning precision plugin calls ``module.to(torch.bfloat16)`` on the LightningModule
(a plain ``torchmetrics.Metric`` would convert its float states in that case).

Calibration (ECE / MCE / reliability bins / accuracy) is defined, exactly as torchmetrics
defines it, on the float32 probabilities ``p = exp(logp.float())`` (clamped to <= 1):
top-label confidence ``max_v p_v`` and prediction ``argmax_v p_v``. torchmetrics casts the
confidences to float32 itself, so using float32 here makes the bin assignment bit-identical
to torchmetrics'; per-bin sums are accumulated in float64. (torchmetrics sums them in
float32 with ``scatter_add_``: its ECE is off by ~1e-3 at 10^6 predictions and by ~0.07 at
10^7, so every ECE/MCE here is computed from float64 bins, with torchmetrics' binning.)

Binning convention (torchmetrics ``_binning_bucketize``, checked against torchmetrics 1.9)
----------------------------------------------------------------------------------------
``edges = torch.linspace(0, 1, n_bins + 1, dtype=float32)``;
``index = torch.bucketize(conf, edges, right=True) - 1``. So bin ``i`` (``0 <= i < n_bins``)
holds ``edges[i] <= conf < edges[i+1]`` (left-closed, right-open; a confidence equal to an
edge goes to the bin *above* it, 0 goes to bin 0), and a confidence of exactly 1.0 goes to
an **extra bin ``n_bins``** of zero width. torchmetrics' ECE/MCE are computed over these
``n_bins + 1`` bins, so the bin arrays here have length ``n_bins + 1``; the last entry is
the "confidence == 1" bin (frequent with bf16 models, whose confident log-probabilities
round to 0). The float32 edges differ from ``k / n_bins`` by up to ~4e-8.

Empty inputs
------------
Nothing here raises on an empty batch (N = 0 rows, or a mask with no True entry):

* ``nll``, ``brier``, ``bayes_gap_bits`` (functional) and ``NLL``, ``Brier``,
  ``BayesGapBits``, the ``acc`` entry of ``CalibrationMetrics`` (metrics, when nothing was
  seen): **NaN** (a mean over no positions).
* ``expected_calibration_error`` (any norm), ``ReliabilityBins`` ``ece``/``mce`` and the
  ``ece``/``mce`` entries of ``CalibrationMetrics``: **0.0** (torchmetrics itself returns
  NaN for an empty L1 ECE, 0 for an empty MCE, raises ``ValueError`` when ``compute`` runs
  before any update, and ``MulticlassAccuracy.update`` raises ``RuntimeError`` on N = 0).
* ``ReliabilityBins`` per-bin ``confidence``/``accuracy``: NaN for every empty bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "nll",
    "brier",
    "bayes_gap_bits",
    "reliability_bins",
    "reliability_bins_from_confidence",
    "expected_calibration_error",
    "bin_edges",
    "NLL",
    "Brier",
    "BayesGapBits",
    "ReliabilityBins",
    "TopLabelCalibrationError",
    "TopLabelAccuracy",
    "CalibrationMetrics",
]

_LN2 = math.log(2.0)
# Rows per chunk are chosen so that a chunk's float64 copy holds at most this many elements
# (32 MiB): a [B*T, V] language-model output is never duplicated whole in float64.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- helpers


def _flatten(
    logp: Tensor, target: Tensor | None, mask: Tensor | None, *, name: str = "logp"
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """[..., V], [...], [...] -> [N, V], [N] (long), [N] (bool) with shape checks."""
    if logp.dim() < 1:
        raise ValueError(f"`{name}` must have a trailing vocabulary dimension, got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"`{name}` must be a floating tensor of log-probabilities, got {logp.dtype}")
    lead = logp.shape[:-1]
    v = logp.shape[-1]
    if target is not None:
        if target.shape != lead:
            raise ValueError(
                f"`target` must have the leading shape of `{name}` {tuple(lead)} (one class index per "
                f"row of log-probabilities), got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"`target` must hold integer class indices, got {target.dtype}")
        target = target.reshape(-1).long()
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"`mask` must have the leading shape of `{name}` {tuple(lead)} (True = valid position), "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.reshape(-1).bool()
    return logp.reshape(-1, v), target, mask


def _chunks(n_rows: int, v: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _count(n: int, mask: Tensor | None, device: torch.device) -> Tensor:
    if mask is None:
        return torch.tensor(float(n), dtype=torch.float64, device=device)
    return mask.sum(dtype=torch.float64)


def _masked_sum(values: Tensor, mask: Tensor | None) -> Tensor:
    """Sum a float64 [N] tensor over the masked rows (masked-out rows may be inf/NaN)."""
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.sum()


def _nll_stats(logp: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    lp, t, m = _flatten(logp, target, mask)
    if m is not None:
        t = torch.where(m, t, torch.zeros_like(t))  # padded targets may be out of range
    picked = lp.gather(1, t.unsqueeze(1)).squeeze(1).double()
    return _masked_sum(-picked, m), _count(lp.shape[0], m, lp.device)


def _brier_stats(logp: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    lp, t, m = _flatten(logp, target, mask)
    if m is not None:
        t = torch.where(m, t, torch.zeros_like(t))
    parts = []
    for sl in _chunks(lp.shape[0], lp.shape[1]):
        p = lp[sl].double().exp()
        p_y = p.gather(1, t[sl].unsqueeze(1)).squeeze(1)
        # sum_v (p_v - 1[v=y])^2 = (1 - p_y)^2 + sum_{v != y} p_v^2
        parts.append((1.0 - p_y).square() + (p.square().sum(1) - p_y.square()))
    per_row = torch.cat(parts) if parts else lp.new_zeros(0, dtype=torch.float64)
    return _masked_sum(per_row, m), _count(lp.shape[0], m, lp.device)


def _kl_bits_rows(model_logp: Tensor, exact_probs: Tensor, normalize: bool) -> Tensor:
    """KL(p_exact || p_model) / ln 2 per row, float64, for [N, V] inputs."""
    parts = []
    for sl in _chunks(model_logp.shape[0], model_logp.shape[1]):
        lq = model_logp[sl].double()
        p = exact_probs[sl].double()
        if normalize:
            lq = lq - torch.logsumexp(lq, dim=1, keepdim=True)
            p = p / p.sum(1, keepdim=True)
        pos = p > 0
        # p log(p/q) where p > 0; exactly 0 where p == 0 (even if q == 0); +inf where p > 0 = q.
        term = torch.where(pos, p * (torch.log(p) - lq), torch.zeros((), dtype=p.dtype, device=p.device))
        parts.append(term.sum(1) / _LN2)
    if not parts:
        return model_logp.new_zeros(0, dtype=torch.float64)
    return torch.cat(parts)


def _bayes_gap_stats(
    model_logp: Tensor, exact_probs: Tensor, mask: Tensor | None = None, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    if exact_probs.shape != model_logp.shape:
        raise ValueError(
            f"`exact_probs` must have the shape of `model_logp` {tuple(model_logp.shape)}, "
            f"got {tuple(exact_probs.shape)}"
        )
    lq, _, m = _flatten(model_logp, None, mask, name="model_logp")
    p = exact_probs.reshape(lq.shape)
    return _masked_sum(_kl_bits_rows(lq, p, normalize), m), _count(lq.shape[0], m, lq.device)


def _top_label(logp: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Top-label float32 confidence, correctness (bool) and the flattened mask.

    Confidence and prediction are ``max`` / ``argmax`` of ``exp(logp.float())``, computed by
    the same ``Tensor.max(dim)`` call torchmetrics uses, clamped to <= 1.
    """
    lp, t, m = _flatten(logp, target, mask)
    confs, preds = [], []
    for sl in _chunks(lp.shape[0], lp.shape[1]):
        c, p = lp[sl].float().exp().max(dim=1)
        confs.append(c)
        preds.append(p)
    if confs:
        conf, pred = torch.cat(confs), torch.cat(preds)
    else:
        conf = lp.new_zeros(0, dtype=torch.float32)
        pred = torch.zeros(0, dtype=torch.long, device=lp.device)
    return conf.clamp_max(1.0), pred.eq(t), m


def bin_edges(n_bins: int = 15, device: torch.device | str | None = None) -> Tensor:
    """The bin edges used for binning: ``torch.linspace(0, 1, n_bins + 1)`` in float32.

    These are torchmetrics' edges (built in the confidences' dtype, which torchmetrics forces
    to float32). Bin ``i < n_bins`` is ``[edges[i], edges[i+1])``; bin ``n_bins`` holds
    confidence exactly 1.0.
    """
    _check_n_bins(n_bins)
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=device)


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}")


def _bin_stats(
    conf: Tensor, correct: Tensor, mask: Tensor | None, n_bins: int, conf_for_sum: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    conf32 = conf.float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=conf.device)
    idx = (torch.bucketize(conf32, edges, right=True) - 1).clamp_(0, n_bins)
    zero = torch.zeros((), dtype=torch.float64, device=conf.device)
    conf64 = (conf if conf_for_sum is None else conf_for_sum).double()
    corr64 = correct.double()
    if mask is None:
        weight = torch.ones_like(conf64)
    else:
        weight = mask.double()
        conf64 = torch.where(mask, conf64, zero)
        corr64 = torch.where(mask, corr64, zero)
    out = [torch.zeros(n_bins + 1, dtype=torch.float64, device=conf.device) for _ in range(3)]
    out[0].scatter_add_(0, idx, weight)
    out[1].scatter_add_(0, idx, conf64)
    out[2].scatter_add_(0, idx, corr64)
    return out[0], out[1], out[2]


def _check_norm(norm: str) -> None:
    if norm not in ("l1", "max", "l2"):
        raise ValueError(f"`norm` must be one of 'l1' (ECE), 'max' (MCE), 'l2' (RMSCE), got {norm!r}")


def _ce_from_bins(count: Tensor, conf_sum: Tensor, correct_sum: Tensor, norm: str = "l1") -> Tensor:
    """Calibration error from float64 bin sums (torchmetrics' formulas); 0.0 with no data.

    l1: ``sum_i |correct_i - conf_i| / N``; max: ``max_i |correct_i - conf_i| / count_i``
    over non-empty bins; l2: ``sqrt(sum_i count_i (acc_i - conf_i)^2 / N)``.
    """
    total = count.sum()
    zero = torch.zeros((), dtype=torch.float64, device=count.device)
    gap_sum = (correct_sum - conf_sum).abs()
    gaps = torch.where(count > 0, gap_sum / count, zero)
    if norm == "l1":
        return torch.where(total > 0, gap_sum.sum() / total, zero)
    if norm == "max":
        return gaps.max() if gaps.numel() else zero
    if norm == "l2":
        return torch.where(total > 0, (count * gaps.square()).sum() / total, zero).sqrt()
    _check_norm(norm)
    raise AssertionError  # unreachable


# ---------------------------------------------------------------------- functional twins


def nll(logp: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood ``-mean_n logp[n, target[n]]`` in nats (float64 scalar).

    Args:
        logp: ``[..., V]`` log-probabilities, any float dtype.
        target: ``[...]`` class indices.
        mask: optional ``[...]`` bool, True at the positions to include.

    Returns NaN when there is no (valid) row. Differentiable with respect to ``logp``.
    """
    s, c = _nll_stats(logp, target, mask)
    return s / c


def brier(logp: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multiclass Brier score ``mean_n sum_v (p[n, v] - 1[v = target[n]])^2``, in [0, 2].

    ``p = exp(logp)`` in float64; the score is not renormalised, so unnormalised inputs are
    scored as given. Returns NaN when there is no (valid) row.
    """
    s, c = _brier_stats(logp, target, mask)
    return s / c


def bayes_gap_bits(
    model_logp: Tensor, exact_probs: Tensor, mask: Tensor | None = None, *, normalize: bool = True
) -> Tensor:
    """Bayes gap ``KL(p_exact || p_model) / ln 2`` in bits, mean over all valid positions.

    Args:
        model_logp: ``[..., V]`` model log-probabilities (``[B, T, V]`` or ``[N, V]``), any
            float dtype (computed in float64).
        exact_probs: same shape, exact posterior-predictive probabilities.
        mask: optional ``[...]`` bool (``[B, T]`` or ``[N]``), True at valid positions.
        normalize: renormalise both distributions in float64 before the KL (default).
            Low-precision log-probabilities (bf16: ~0.4% relative error per probability) are
            not exactly normalised, and the KL of an unnormalised ``p_model`` can be
            negative by more than the gap being measured; renormalising makes the value
            >= 0 (up to float64 rounding) and its error second order near the Bayes
            predictor. With ``normalize=False`` the literal formula is used on the inputs
            as given (exactly 0 when ``model_logp == exact_probs.log()``).

    Terms with ``p_exact = 0`` contribute exactly 0 (no NaN, whatever ``p_model`` is); a
    position where ``p_exact > 0`` but ``model_logp = -inf`` gives ``+inf`` (not clamped).
    Returns NaN when there is no valid position.
    """
    s, c = _bayes_gap_stats(model_logp, exact_probs, mask, normalize)
    return s / c


def reliability_bins_from_confidence(
    confidence: Tensor, correct: Tensor, n_bins: int = 15, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Bin given top-label confidences with torchmetrics' convention (see module docstring).

    Args:
        confidence: ``[N]`` confidences in [0, 1]; binned after rounding to float32 (as
            torchmetrics does), summed in float64 from the given values.
        correct: ``[N]`` bool/0-1, whether the top-label prediction was right.
        n_bins: number of equal-width bins on [0, 1).
        mask: optional ``[N]`` bool, True at the rows to include.

    Returns:
        ``(count, conf_sum, correct_sum)``, float64, each of length ``n_bins + 1``; the last
        entry is the bin for confidence exactly 1.0.
    """
    _check_n_bins(n_bins)
    confidence = confidence.reshape(-1)
    correct = correct.reshape(-1)
    if mask is not None:
        mask = mask.reshape(-1).bool()
    return _bin_stats(confidence.float(), correct, mask, n_bins, conf_for_sum=confidence)


def reliability_bins(
    logp: Tensor, target: Tensor, n_bins: int = 15, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-label reliability bins ``(count, conf_sum, correct_sum)``, float64, length ``n_bins + 1``.

    Confidence and prediction come from ``exp(logp.float())`` exactly as torchmetrics'
    ``multiclass_calibration_error`` sees them when fed those probabilities; bins follow
    torchmetrics' ``_binning_bucketize`` (bin ``i < n_bins`` is ``[i/n, (i+1)/n)`` with
    float32 edges, bin ``n_bins`` holds confidence exactly 1). So
    ``sum(|correct_sum - conf_sum|) / sum(count)`` equals torchmetrics' L1 ECE and
    ``max_i |correct_sum_i - conf_sum_i| / count_i`` its MCE (up to float32 summation
    rounding on torchmetrics' side). All-zero arrays for an empty input.
    """
    _check_n_bins(n_bins)
    conf, correct, m = _top_label(logp, target, mask)
    return _bin_stats(conf, correct, m, n_bins)


def expected_calibration_error(
    logp: Tensor,
    target: Tensor,
    n_bins: int = 15,
    norm: str = "l1",
    mask: Tensor | None = None,
) -> Tensor:
    """Top-label calibration error, torchmetrics' definition, summed in float64.

    ``norm="l1"`` is the ECE, ``"max"`` the MCE, ``"l2"`` the RMS calibration error (no
    debiasing) -- the quantities of torchmetrics' ``multiclass_calibration_error`` fed with
    ``exp(logp.float())``: same confidences, predictions and bins (see the module
    docstring), so the values agree with torchmetrics to its float32 rounding. The per-bin
    sums are float64 here: torchmetrics accumulates them in float32 with ``scatter_add_``,
    which drifts by ~1e-3 at 10^6 predictions and by ~0.07 at 10^7 (a language-model
    validation set), while these stay exact to ~1e-12.

    Returns a float64 scalar; **0.0 for an empty input** (torchmetrics: NaN for L1, 0 for
    max on an empty batch).
    """
    _check_norm(norm)
    count, conf_sum, correct_sum = reliability_bins(logp, target, n_bins, mask)
    return _ce_from_bins(count, conf_sum, correct_sum, norm)


# ------------------------------------------------------------------------- metric classes


class _Float64StateMetric(Metric):
    """A Metric whose tensor states are float64 and stay float64.

    torchmetrics guards its states against ``.half()``/``.float()``/``.double()`` but not
    against ``module.to(dtype)``, which Lightning's ``*-true`` precision plugins call on the
    whole LightningModule; this override keeps the states float64 there too (only their
    device follows). ``set_dtype`` does not change them either.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        exclude = tuple(exclude_state)
        own = tuple(k for k in self._defaults if k not in exclude)
        this = super()._apply(fn, exclude_state=exclude + own)
        device = this.device
        for key in own:
            this._defaults[key] = this._defaults[key].to(device=device, dtype=torch.float64)
            setattr(this, key, getattr(this, key).to(device=device, dtype=torch.float64))
        return this

    def _add_f64_state(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")


class NLL(_Float64StateMetric):
    """Mean negative log-likelihood in nats; float64 sum/count states (DDP: summed).

    ``update(logp, target, mask=None)``; ``compute()`` is NaN when nothing was seen.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_f64_state("nll_sum")
        self._add_f64_state("count")

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        s, c = _nll_stats(logp, target, mask)
        # out-of-place: safe when updates alternate between inference_mode and normal mode
        self.nll_sum = self.nll_sum + s.to(self.nll_sum.device)
        self.count = self.count + c.to(self.count.device)

    def compute(self) -> Tensor:
        return self.nll_sum / self.count


class Brier(_Float64StateMetric):
    """Mean multiclass Brier score (range [0, 2]); float64 states. NaN when nothing was seen."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_f64_state("brier_sum")
        self._add_f64_state("count")

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        s, c = _brier_stats(logp, target, mask)
        self.brier_sum = self.brier_sum + s.to(self.brier_sum.device)
        self.count = self.count + c.to(self.count.device)

    def compute(self) -> Tensor:
        return self.brier_sum / self.count


class BayesGapBits(_Float64StateMetric):
    """Mean ``KL(p_exact || p_model) / ln 2`` (bits) over valid positions; float64 states.

    ``update(model_logp, exact_probs, mask=None)`` with ``[..., V]`` inputs and an optional
    ``[...]`` mask (True = valid). ``compute()`` is NaN when nothing was seen and ``+inf`` if
    the model ever gave probability 0 to an outcome the exact predictive allows.
    ``normalize`` as in :func:`bayes_gap_bits`.
    """

    def __init__(self, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self._add_f64_state("kl_bits_sum")
        self._add_f64_state("count")

    def update(self, model_logp: Tensor, exact_probs: Tensor, mask: Tensor | None = None) -> None:
        s, c = _bayes_gap_stats(model_logp, exact_probs, mask, self.normalize)
        self.kl_bits_sum = self.kl_bits_sum + s.to(self.kl_bits_sum.device)
        self.count = self.count + c.to(self.count.device)

    def compute(self) -> Tensor:
        return self.kl_bits_sum / self.count


class ReliabilityBins(_Float64StateMetric):
    """Accumulated top-label reliability bins (torchmetrics' binning, ``n_bins + 1`` bins).

    States: ``bin_count``, ``bin_conf_sum``, ``bin_correct_sum``, float64 ``[n_bins + 1]``,
    sum-reduced across processes (O(n_bins) memory, unlike torchmetrics'
    ``MulticlassCalibrationError`` which keeps every confidence).

    ``compute()`` returns a dict of float64 tensors:

    * ``count`` ``[n_bins + 1]``; ``confidence``, ``accuracy`` ``[n_bins + 1]`` per-bin means
      (NaN for empty bins); the last bin holds confidence exactly 1.0;
    * ``edges`` ``[n_bins + 1]``: the bin edges (float32 values, as float64);
    * ``ece``, ``mce``: scalars from the bins, equal to torchmetrics' L1 / max calibration
      error on the same data (0.0 when nothing was seen).
    """

    higher_is_better = None  # a dict of diagnostics

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_n_bins(n_bins)
        self.n_bins = n_bins
        self._add_f64_state("bin_count", (n_bins + 1,))
        self._add_f64_state("bin_conf_sum", (n_bins + 1,))
        self._add_f64_state("bin_correct_sum", (n_bins + 1,))

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        count, conf_sum, correct_sum = reliability_bins(logp, target, self.n_bins, mask)
        dev = self.bin_count.device
        self.bin_count = self.bin_count + count.to(dev)
        self.bin_conf_sum = self.bin_conf_sum + conf_sum.to(dev)
        self.bin_correct_sum = self.bin_correct_sum + correct_sum.to(dev)

    def compute(self) -> dict[str, Tensor]:
        count = self.bin_count
        nan = torch.full((), float("nan"), dtype=torch.float64, device=count.device)
        nonempty = count > 0
        ece = _ce_from_bins(count, self.bin_conf_sum, self.bin_correct_sum, "l1")
        mce = _ce_from_bins(count, self.bin_conf_sum, self.bin_correct_sum, "max")
        return {
            "count": count,
            "confidence": torch.where(nonempty, self.bin_conf_sum / count, nan),
            "accuracy": torch.where(nonempty, self.bin_correct_sum / count, nan),
            "edges": bin_edges(self.n_bins, device=count.device).double(),
            "ece": ece,
            "mce": mce,
        }


class TopLabelCalibrationError(MulticlassCalibrationError):
    """torchmetrics' ``MulticlassCalibrationError`` fed with log-probabilities, summed in float64.

    ``update(logp, target, mask=None)`` appends exactly what torchmetrics' own update appends
    for the probabilities ``exp(logp.float())`` (float32 top-label confidence and 0/1
    correctness), without materialising the ``[N, V]`` probabilities. State (``cat`` lists)
    and DDP sync are torchmetrics'. Differences from torchmetrics, all deliberate:

    * ``compute()`` bins with torchmetrics' convention and float32 edges but sums the bins in
      float64 (torchmetrics' float32 ``scatter_add_`` is off by ~1e-3 at 10^6 predictions
      and ~0.07 at 10^7); it returns a float64 scalar;
    * an update with no rows is a no-op (torchmetrics appends an empty tensor);
    * ``compute()`` returns **0.0** when no row was seen on any process (torchmetrics raises
      ``ValueError`` before any update, and returns NaN for L1 after empty updates).

    Memory grows with the number of rows (8 bytes per row); :class:`ReliabilityBins` gives
    identical ECE/MCE values in O(n_bins).
    """

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        if logp.shape[-1] != self.num_classes:
            raise ValueError(f"Expected {self.num_classes} classes in `logp`, got shape {tuple(logp.shape)}")
        conf, correct, m = _top_label(logp, target, mask)
        if self.validate_args:
            _check_targets(target, mask, self.num_classes)
        if m is not None:
            conf, correct = conf[m], correct[m]
        if conf.numel() == 0:
            return
        self.confidences.append(conf.float())
        self.accuracies.append(correct.float())

    def compute(self) -> Tensor:
        conf, acc = self.confidences, self.accuracies
        if isinstance(conf, list):  # not synced: local lists (possibly empty)
            if not conf:
                return torch.zeros((), dtype=torch.float64, device=self.device)
            conf, acc = dim_zero_cat(conf), dim_zero_cat(acc)
        count, conf_sum, correct_sum = _bin_stats(conf, acc, None, self.n_bins)
        return _ce_from_bins(count, conf_sum, correct_sum, self.norm)


class TopLabelAccuracy(MulticlassAccuracy):
    """torchmetrics' micro ``MulticlassAccuracy`` fed with log-probabilities.

    The prediction is the argmax of ``exp(logp.float())`` (the same as the calibration
    metrics use). An update with no rows is a no-op (torchmetrics raises on N = 0), and
    ``compute()`` is **NaN** when no row was seen (torchmetrics returns 0).
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        kwargs.setdefault("average", "micro")
        super().__init__(num_classes=num_classes, **kwargs)

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        if logp.shape[-1] != self.num_classes:
            raise ValueError(f"Expected {self.num_classes} classes in `logp`, got shape {tuple(logp.shape)}")
        lp, t, m = _flatten(logp, target, mask)
        if m is not None:
            lp, t = lp[m], t[m]
        if lp.shape[0] == 0:
            return
        pred = torch.cat([lp[sl].float().exp().argmax(dim=1) for sl in _chunks(lp.shape[0], lp.shape[1])])
        super().update(pred, t)

    def compute(self) -> Tensor:
        tp, fp, tn, fn = self._final_state()
        value = super().compute()
        seen = (tp + fn).sum() > 0
        return torch.where(seen, value, torch.full_like(value, float("nan")))


def _check_targets(target: Tensor, mask: Tensor | None, num_classes: int) -> None:
    t = target.reshape(-1)
    if mask is not None:
        t = t[mask.reshape(-1).bool()]
    if t.numel() and (bool((t < 0).any()) or bool((t >= num_classes).any())):
        raise ValueError(f"`target` values must lie in [0, {num_classes - 1}]")


class CalibrationMetrics(MetricCollection):
    """The per-split metric set of DESIGN.md section 5, updated with ``(logp, target[, mask])``.

    Entries (names as logged, before ``prefix``/``postfix``):

    * ``nll``   -- :class:`NLL` (nats/token; NaN when nothing was seen)
    * ``brier`` -- :class:`Brier` (NaN when nothing was seen)
    * ``ece``   -- :class:`TopLabelCalibrationError` (torchmetrics ``MulticlassCalibrationError``,
      ``norm="l1"``, ``n_bins`` bins; 0.0 when nothing was seen)
    * ``mce``   -- the same with ``norm="max"`` (0.0 when nothing was seen); shares ``ece``'s
      state (one torchmetrics compute group)
    * ``acc``   -- :class:`TopLabelAccuracy` (torchmetrics ``MulticlassAccuracy``,
      ``average="micro"``; NaN when nothing was seen)

    ``update``/``forward`` with zero rows are harmless and ``compute()`` never raises. With
    ``reliability=True`` a :class:`ReliabilityBins` (``self.reliability``) is updated
    alongside and reset with the collection; it is kept out of the collection's entries so
    that ``compute()`` and ``LightningModule.log_dict(collection)`` see scalars only, and it
    follows the collection's ``.to(device)``. ``collection.reset()`` resets it; Lightning,
    when given the collection itself to ``log_dict``, resets only the entries, so then
    call ``collection.reliability.reset()`` after drawing the diagram at epoch end.
    """

    def __init__(
        self,
        vocab_size: int,
        n_bins: int = 15,
        *,
        prefix: str | None = None,
        postfix: str | None = None,
        reliability: bool = True,
        validate_args: bool = True,
    ) -> None:
        _check_n_bins(n_bins)
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"`vocab_size` must be an integer >= 2, got {vocab_size!r}")
        metrics = {
            "nll": NLL(),
            "brier": Brier(),
            "ece": TopLabelCalibrationError(vocab_size, n_bins=n_bins, norm="l1", validate_args=validate_args),
            "mce": TopLabelCalibrationError(vocab_size, n_bins=n_bins, norm="max", validate_args=validate_args),
            "acc": TopLabelAccuracy(vocab_size, validate_args=validate_args),
        }
        super().__init__(metrics, prefix=prefix, postfix=postfix, compute_groups=[["ece", "mce"]])
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        # Not a registered submodule (it would become a collection entry); moved in _apply.
        object.__setattr__(self, "_reliability", ReliabilityBins(n_bins) if reliability else None)

    @property
    def reliability(self) -> ReliabilityBins | None:
        """The :class:`ReliabilityBins` updated alongside (None if built with ``reliability=False``)."""
        return self._reliability

    def update(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        super().update(logp, target, mask)
        if self._reliability is not None:
            self._reliability.update(logp, target, mask)

    def forward(self, logp: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, Any]:  # type: ignore[override]
        """Accumulate and return this batch's values (same empty-batch conventions)."""
        out = super().forward(logp, target, mask)
        if self._reliability is not None:
            self._reliability.update(logp, target, mask)
        return out

    def reset(self) -> None:
        super().reset()
        if self._reliability is not None:
            self._reliability.reset()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "CalibrationMetrics":
        super()._apply(fn, *args, **kwargs)
        if self._reliability is not None:
            self._reliability._apply(fn)
        return self
