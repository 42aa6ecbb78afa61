"""Tests for bayestrain.metrics and bayestrain.plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error
from torchmetrics.functional.classification.calibration_error import _binning_bucketize

from bayestrain import metrics as M
from bayestrain.plots import figure_to_rgb_array, reliability_diagram, save_figure

LN2 = math.log(2.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_logp(n: int, v: int, seed: int = 0, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    g = _gen(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1).to(dtype)


def _random_data(n: int = 2000, v: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    logits = torch.randn(n, v, generator=g) * 2.5
    logits[: n // 20] *= 200.0  # some rows with top-label confidence exactly 1.0 in float32
    logp = torch.log_softmax(logits, -1)
    # targets drawn near the model's distribution, so accuracy is neither 0 nor 1
    target = torch.multinomial(torch.softmax(logits / 2.0, -1), 1, generator=g).squeeze(1)
    return logp, target


def _tm_ece(logp, target, n_bins=15, norm="l1"):
    return multiclass_calibration_error(
        logp.float().exp(), target, num_classes=logp.shape[-1], n_bins=n_bins, norm=norm
    ).double()


# ------------------------------------------------------------------------ NLL and Brier


def test_nll_and_brier_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    logp = p.log()
    expected_nll = -(math.log(0.5) + math.log(0.8)) / 2
    # row 0: (0.5-1)^2 + 0.25^2 + 0.25^2 = 0.375 ; row 1: 0.1^2 + (0.8-1)^2 + 0.1^2 = 0.06
    expected_brier = (0.375 + 0.06) / 2
    assert M.nll(logp, target).item() == pytest.approx(expected_nll, abs=1e-15)
    assert M.brier(logp, target).item() == pytest.approx(expected_brier, abs=1e-15)
    assert M.nll(logp, target).dtype == torch.float64


def test_brier_extremes_and_range():
    target = torch.tensor([0, 1])
    perfect = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])
    wrong = torch.tensor([[-math.inf, 0.0], [0.0, -math.inf]])
    assert M.brier(perfect, target).item() == 0.0
    assert M.brier(wrong, target).item() == 2.0
    logp, t = _random_data(500, 9)
    b = M.brier(logp, t).item()
    assert 0.0 < b < 2.0


def test_nll_brier_accept_bt_shapes_and_mask_with_garbage():
    logp = _random_logp(24, 5, seed=1).reshape(4, 6, 5)
    target = torch.randint(0, 5, (4, 6), generator=_gen(1))
    mask = torch.rand(4, 6, generator=_gen(2)) > 0.4
    garbage_logp = logp.clone()
    garbage_logp[~mask] = float("nan")
    garbage_target = target.clone()
    garbage_target[~mask] = -100  # typical ignore-index padding, out of range
    for fn in (M.nll, M.brier):
        expected = fn(logp[mask], target[mask])
        got = fn(garbage_logp, garbage_target, mask)
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(expected.item(), abs=1e-14)
        assert fn(logp, target).item() == pytest.approx(fn(logp.reshape(-1, 5), target.reshape(-1)).item(), abs=1e-14)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="leading shape"):
        M.nll(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        M.brier(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool))


def test_nll_is_differentiable():
    logits = torch.randn(5, 4, generator=_gen(3), requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0])
    M.nll(torch.log_softmax(logits, -1), target).backward()
    expected = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, 4)) / 5
    torch.testing.assert_close(logits.grad, expected.detach().float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- Bayes gap


def _direct_kl_bits(model_logp: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Plain float64 KL on strictly positive inputs, per position."""
    p = exact.double()
    return (p * (p.log() - model_logp.double())).sum(-1) / LN2


def test_bayes_gap_matches_direct_kl():
    g = _gen(4)
    exact = torch.distributions.Dirichlet(torch.full((5,), 0.7, dtype=torch.float64)).sample((3, 7))
    model = torch.log_softmax(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), -1)
    expected = _direct_kl_bits(model, exact).mean()
    for normalize in (True, False):
        got = M.bayes_gap_bits(model, exact, normalize=normalize)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected.item(), rel=1e-12)
        assert got.item() > 0.0
    # [B, T, V] and the flattened [N, V] give the same value
    assert M.bayes_gap_bits(model.reshape(21, 5), exact.reshape(21, 5)).item() == pytest.approx(expected.item(), rel=1e-12)


def test_bayes_gap_zero_at_exact_and_positive_otherwise():
    exact = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((50,))
    assert M.bayes_gap_bits(exact.log(), exact, normalize=False).item() == 0.0
    assert abs(M.bayes_gap_bits(exact.log(), exact).item()) < 1e-13
    perturbed = torch.log_softmax(exact.log() + 1e-3 * torch.randn(50, 4, generator=_gen(5), dtype=torch.float64), -1)
    assert M.bayes_gap_bits(perturbed, exact).item() > 0.0


def test_bayes_gap_exact_zeros_and_infinite_gap():
    exact = torch.tensor([[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]], dtype=torch.float64)
    # model gives probability 0 where the exact law does too: contributes 0, no NaN
    model = torch.tensor([[-math.inf, math.log(0.5), math.log(0.5)], [math.log(0.5), math.log(0.5), -math.inf]], dtype=torch.float64)
    got = M.bayes_gap_bits(model, exact)
    expected = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)) / LN2 / 2
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # a finite model with exact zeros is finite too
    assert torch.isfinite(M.bayes_gap_bits(torch.log_softmax(torch.zeros(2, 3), -1), exact))
    # model_logp = -inf where exact > 0: the gap is +inf (not clamped, not NaN)
    bad = model.clone()
    bad[0, 1] = -math.inf
    assert M.bayes_gap_bits(bad, exact).item() == math.inf
    assert M.bayes_gap_bits(bad, exact, normalize=False).item() == math.inf


def test_bayes_gap_mask_respected():
    g = _gen(6)
    exact = torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).sample((2, 5))
    model = torch.log_softmax(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, False, False]])
    expected = _direct_kl_bits(model, exact)[mask].mean()
    model_garbage = model.clone()
    model_garbage[~mask] = float("nan")
    got = M.bayes_gap_bits(model_garbage, exact, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    # flattened mask form
    got_flat = M.bayes_gap_bits(model_garbage.reshape(10, 3), exact.reshape(10, 3), mask.reshape(10))
    assert got_flat.item() == pytest.approx(expected.item(), rel=1e-12)


def test_bayes_gap_normalize_keeps_bf16_gap_nonnegative():
    exact = torch.distributions.Dirichlet(torch.ones(8, dtype=torch.float64)).sample((400,))
    model_bf16 = exact.log().bfloat16()  # the Bayes predictor, stored in bf16
    gap = M.bayes_gap_bits(model_bf16, exact)
    assert gap.item() >= -1e-15
    assert gap.item() < 1e-3


# ----------------------------------------------------------------- calibration: binning


def test_binning_convention_matches_torchmetrics_at_edges():
    n_bins = 15
    edges = M.bin_edges(n_bins)
    assert torch.equal(edges, torch.linspace(0, 1, n_bins + 1))  # float32, torchmetrics' edges
    below = torch.nextafter(edges, torch.tensor(0.0))
    above = torch.nextafter(edges, torch.tensor(1.0))
    conf = torch.cat([torch.tensor([0.0]), edges, below[1:], above[:-1]])
    correct = torch.rand(conf.shape, generator=_gen(7)) > 0.5
    count, conf_sum, correct_sum = M.reliability_bins_from_confidence(conf, correct, n_bins)
    assert count.shape == (n_bins + 1,) and count.dtype == torch.float64
    # torchmetrics' own binning on the same confidences
    acc_bin, conf_bin, prop_bin = _binning_bucketize(conf, correct.float(), edges)
    torch.testing.assert_close(count / count.sum(), prop_bin.double(), atol=1e-7, rtol=0)
    nonempty = count > 0
    torch.testing.assert_close((conf_sum / count)[nonempty], conf_bin.double()[nonempty], atol=1e-6, rtol=0)
    torch.testing.assert_close((correct_sum / count)[nonempty], acc_bin.double()[nonempty], atol=1e-6, rtol=0)

    def bin_of(c: float | torch.Tensor) -> int:
        cnt, _, _ = M.reliability_bins_from_confidence(torch.as_tensor(c, dtype=torch.float32).reshape(1), torch.ones(1), n_bins)
        return int(cnt.argmax())

    assert bin_of(0.0) == 0
    assert bin_of(edges[1]) == 1  # "exactly 1/15" (float32 edge) opens bin 1: left-closed bins
    assert bin_of(below[1]) == 0
    assert bin_of(edges[2]) == 2  # "exactly 2/15"
    assert bin_of(below[2]) == 1
    assert bin_of(edges[14]) == 14
    assert bin_of(below[15]) == 14  # just under 1
    assert bin_of(1.0) == n_bins  # exactly 1: torchmetrics' extra bin


def _logp_with_exact_top_prob(c: torch.Tensor, v: int) -> torch.Tensor | None:
    """A float32 row whose exp() has top probability exactly c, or None if none is near log(c)."""
    y = torch.log(c.double()).float()
    cands = [y]
    up, dn = y.clone(), y.clone()
    for _ in range(16):
        up, dn = torch.nextafter(up, torch.tensor(0.0)), torch.nextafter(dn, torch.tensor(-100.0))
        cands += [up, dn]
    rest = math.log((1.0 - c.item()) / (v - 1))
    for cand in cands:
        row = torch.full((v,), rest, dtype=torch.float32)
        row[0] = cand
        if row.exp()[0] == c and row.exp().max() == c:
            return row
    return None


def test_exact_edge_confidences_end_to_end():
    n_bins, v = 15, 16
    edges = M.bin_edges(n_bins)
    rows, expected_bins = [], []
    for k in range(2, n_bins):  # edges above 1/16 (top label >= 1/V)
        row = _logp_with_exact_top_prob(edges[k], v)
        if row is not None:
            rows.append(row)
            expected_bins.append(k)
    assert len(rows) >= 8  # most float32 edges are reachable as exp(float32)
    logp = torch.stack(rows)
    target = torch.zeros(len(rows), dtype=torch.long)
    target[::2] = 1
    count, conf_sum, _ = M.reliability_bins(logp, target, n_bins)
    assert torch.equal(torch.nonzero(count).squeeze(1), torch.tensor(expected_bins))
    torch.testing.assert_close(conf_sum[expected_bins], edges[expected_bins].double(), atol=0, rtol=0)
    rb = M.ReliabilityBins(n_bins)
    rb.update(logp, target)
    out = rb.compute()
    assert out["ece"].item() == pytest.approx(_tm_ece(logp, target).item(), abs=1e-6)
    assert out["mce"].item() == pytest.approx(_tm_ece(logp, target, norm="max").item(), abs=1e-6)


def test_quarter_edge_is_left_closed():
    logp = torch.log(torch.full((5, 4), 0.25))  # uniform over 4 classes: confidence exactly 0.25
    assert torch.all(logp.exp() == 0.25)
    target = torch.tensor([0, 1, 2, 3, 0])
    count, _, correct_sum = M.reliability_bins(logp, target, n_bins=4)
    assert count.tolist() == [0.0, 5.0, 0.0, 0.0, 0.0]  # 0.25 opens bin 1, not closes bin 0
    assert correct_sum.tolist() == [0.0, 2.0, 0.0, 0.0, 0.0]  # argmax = first index (class 0)
    ece = M.expected_calibration_error(logp, target, n_bins=4)
    assert ece.item() == pytest.approx(abs(2 / 5 - 0.25), abs=1e-7)


def test_confidence_exactly_one():
    # V = 2 with p = [0, 1]: top-label confidence exactly 1.0
    logp = torch.tensor([[-math.inf, 0.0]] * 8)
    target = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])  # accuracy 6/8
    count, conf_sum, correct_sum = M.reliability_bins(logp, target)
    assert count[-1].item() == 8.0 and count[:-1].sum().item() == 0.0
    assert conf_sum[-1].item() == 8.0 and correct_sum[-1].item() == 6.0
    for norm, expected in (("l1", 0.25), ("max", 0.25)):
        assert M.expected_calibration_error(logp, target, norm=norm).item() == pytest.approx(expected, abs=1e-7)
        assert _tm_ece(logp, target, norm=norm).item() == pytest.approx(expected, abs=1e-7)
    rb = M.ReliabilityBins()
    rb.update(logp, target)
    out = rb.compute()
    assert out["ece"].item() == 0.25 and out["mce"].item() == 0.25
    assert out["confidence"][-1].item() == 1.0 and out["accuracy"][-1].item() == 0.75
    assert torch.isnan(out["accuracy"][:-1]).all()


def test_conf_one_bin_is_kept_separate_like_torchmetrics():
    # an under-confident bin 14 next to over-confident conf==1 predictions: merging the two
    # bins would cancel their gaps; torchmetrics keeps them apart, and so do we.
    row14 = torch.log(torch.tensor([0.95, 0.05]))
    row1 = torch.tensor([0.0, -math.inf])
    logp = torch.stack([row14] * 4 + [row1] * 4)
    target = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])  # bin 14 acc 1.0, conf==1 bin acc 0.5
    rb = M.ReliabilityBins()
    rb.update(logp, target)
    ece = rb.compute()["ece"].item()
    expected = 0.5 * abs(1.0 - logp[0].exp().max().item()) + 0.5 * 0.5
    assert ece == pytest.approx(expected, abs=1e-7)
    assert ece == pytest.approx(_tm_ece(logp, target).item(), abs=1e-6)


def test_all_equally_confident_ece_is_abs_gap():
    row = torch.log_softmax(torch.tensor([2.0, 0.5, -1.0, 0.0]), -1)
    n = 40
    logp = row.expand(n, 4).contiguous()
    target = torch.ones(n, dtype=torch.long)
    target[:17] = 0  # accuracy 17/40
    c = logp.float().exp().max(-1).values[0].double().item()
    expected = abs(17 / 40 - c)
    rb = M.ReliabilityBins()
    rb.update(logp, target)
    out = rb.compute()
    assert out["ece"].item() == pytest.approx(expected, abs=1e-15)
    assert out["mce"].item() == pytest.approx(expected, abs=1e-15)
    assert int((out["count"] > 0).sum()) == 1
    assert M.expected_calibration_error(logp, target).item() == pytest.approx(expected, abs=1e-15)
    assert M.expected_calibration_error(logp, target, norm="max").item() == pytest.approx(expected, abs=1e-15)
    assert M.expected_calibration_error(logp, target, norm="l2").item() == pytest.approx(expected, abs=1e-15)
    # torchmetrics agrees to its float32 summation
    assert _tm_ece(logp, target).item() == pytest.approx(expected, abs=1e-6)


def test_ece_from_bins_equals_torchmetrics_on_random_data():
    for seed, v, n_bins in ((0, 6, 15), (1, 50, 15), (2, 3, 10)):
        logp, target = _random_data(3000, v, seed)
        rb = M.ReliabilityBins(n_bins)
        rb.update(logp, target)
        out = rb.compute()
        tm_ece = _tm_ece(logp, target, n_bins)
        tm_mce = _tm_ece(logp, target, n_bins, norm="max")
        assert out["count"][-1].item() > 0  # the conf == 1 bin is exercised
        assert out["ece"].item() == pytest.approx(tm_ece.item(), abs=1e-6)
        assert out["mce"].item() == pytest.approx(tm_mce.item(), abs=1e-6)
        assert out["mce"].item() >= out["ece"].item()
        assert 0.0 < out["ece"].item() < 1.0
        ece_f = M.expected_calibration_error(logp, target, n_bins)
        assert ece_f.item() == pytest.approx(out["ece"].item(), abs=1e-15)
        tm_l2 = _tm_ece(logp, target, n_bins, norm="l2")
        assert M.expected_calibration_error(logp, target, n_bins, norm="l2").item() == pytest.approx(tm_l2.item(), abs=1e-6)
        # bins from the functional twin give the same ECE
        count, conf_sum, correct_sum = M.reliability_bins(logp, target, n_bins)
        assert ((correct_sum - conf_sum).abs().sum() / count.sum()).item() == pytest.approx(out["ece"].item(), abs=1e-15)


def test_calibration_sums_are_float64_at_language_model_scale():
    # 10^6 predictions in one bin, perfectly calibrated up to float32 rounding of the
    # confidences. torchmetrics' float32 scatter_add_ drifts here (about 9e-4 in
    # torchmetrics 1.9); float64 bins stay exact.
    n = 10**6
    rows = torch.log(torch.tensor([[0.9, 0.1], [0.91, 0.09]]))
    logp = rows.repeat(n // 2, 1)
    conf = logp.float().exp().max(-1).values.double()
    target = torch.ones(n, dtype=torch.long)
    n_correct = 905_000
    target[:n_correct] = 0
    exact = abs(n_correct - math.fsum(conf.tolist())) / n
    assert M.expected_calibration_error(logp, target).item() == pytest.approx(exact, abs=1e-12)
    metric = M.TopLabelCalibrationError(2)
    for lp, t in zip(logp.split(250_000), target.split(250_000)):
        metric.update(lp, t)
    assert metric.compute().item() == pytest.approx(exact, abs=1e-12)
    rb = M.ReliabilityBins()
    rb.update(logp, target)
    assert rb.compute()["ece"].item() == pytest.approx(exact, abs=1e-12)


# -------------------------------------------------------------------------- empty input


def test_empty_batch_functional():
    v = 5
    logp = torch.zeros(0, v)
    target = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(M.nll(logp, target))
    assert torch.isnan(M.brier(logp, target))
    assert torch.isnan(M.bayes_gap_bits(logp, torch.zeros(0, v)))
    for norm in ("l1", "max"):
        ece = M.expected_calibration_error(logp, target, norm=norm)
        assert ece.item() == 0.0 and isinstance(ece, torch.Tensor)
    for arr in M.reliability_bins(logp, target):
        assert arr.shape == (16,) and arr.sum().item() == 0.0
    # a mask with no True entry is an empty input too
    full = _random_logp(4, v)
    t4 = torch.zeros(4, dtype=torch.long)
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.isnan(M.nll(full, t4, none))
    assert M.expected_calibration_error(full, t4, mask=none).item() == 0.0


def test_empty_batch_metrics_do_not_raise():
    v = 5
    logp = torch.zeros(0, v)
    target = torch.zeros(0, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns on compute() before update()
        for metric, args in (
            (M.NLL(), (logp, target)),
            (M.Brier(), (logp, target)),
            (M.BayesGapBits(), (logp, torch.zeros(0, v))),
        ):
            assert torch.isnan(metric.compute())  # nothing seen: NaN
            metric.update(*args)
            assert torch.isnan(metric.compute())
        rb = M.ReliabilityBins()
        rb.update(logp, target)
        out = rb.compute()
        assert out["ece"].item() == 0.0 and out["mce"].item() == 0.0
        assert torch.isnan(out["confidence"]).all() and torch.isnan(out["accuracy"]).all()

        cm = M.CalibrationMetrics(v)
        expected_empty = {"nll": "nan", "brier": "nan", "ece": 0.0, "mce": 0.0, "acc": "nan"}

        def check(values):
            assert set(values) == set(expected_empty)
            for k, e in expected_empty.items():
                if e == "nan":
                    assert torch.isnan(values[k]), k
                else:
                    assert values[k].item() == e, k

        check(cm.compute())  # no update at all
        cm.update(logp, target)
        cm.update(_random_logp(3, v), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool))
        check(cm.compute())  # only empty updates
        check(cm(logp, target))  # forward on an empty batch
        # real data after empty updates is unaffected by them
        full, t = _random_data(300, v, seed=3)
        cm.update(full, t)
        got = cm.compute()
        assert got["nll"].item() == pytest.approx(M.nll(full, t).item(), abs=1e-12)
        assert got["ece"].item() == pytest.approx(_tm_ece(full, t).item(), abs=1e-7)
        assert got["acc"].item() == pytest.approx(multiclass_accuracy(full, t, v, average="micro").item(), abs=1e-7)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_input_equals_float32_upcast(low):
    v = 7
    logp_low = _random_logp(600, v, seed=8, scale=3.0).to(low)
    logp_up = logp_low.float()
    g = _gen(8)
    target = torch.randint(0, v, (600,), generator=g)
    exact = torch.distributions.Dirichlet(torch.ones(v, dtype=torch.float64)).sample((600,))
    for fn in (M.nll, M.brier, M.expected_calibration_error):
        assert torch.equal(fn(logp_low, target), fn(logp_up, target)), fn.__name__
    assert torch.equal(M.bayes_gap_bits(logp_low, exact), M.bayes_gap_bits(logp_up, exact))
    for a, b in zip(M.reliability_bins(logp_low, target), M.reliability_bins(logp_up, target)):
        assert torch.equal(a, b)
    cm_low, cm_up = M.CalibrationMetrics(v), M.CalibrationMetrics(v)
    cm_low.update(logp_low, target)
    cm_up.update(logp_up, target)
    r_low, r_up = cm_low.compute(), cm_up.compute()
    for k in r_low:
        assert torch.equal(r_low[k], r_up[k]), k
    # ...and the float64 result is the exact value of the rounded inputs, not a bf16 sum
    manual = -logp_low.double().gather(1, target[:, None]).mean()
    assert M.nll(logp_low, target).item() == pytest.approx(manual.item(), rel=1e-14)
    assert r_low["nll"].dtype == torch.float64


def test_many_tiny_updates_stay_accurate():
    n_updates, rows, v = 1000, 1000, 2
    g = _gen(9)
    tiny = torch.rand(n_updates * rows, generator=g, dtype=torch.float64) * 1e-6 + 1e-8  # per-token NLL
    logp = torch.stack([-tiny, torch.log(-torch.expm1(-tiny))], dim=1)  # p(target=0) = exp(-tiny)
    target = torch.zeros(n_updates * rows, dtype=torch.long)
    reference = math.fsum(tiny.tolist()) / tiny.numel()

    metric = M.NLL()
    for lp, t in zip(logp.split(rows), target.split(rows)):
        metric.update(lp, t)
    chunked = metric.compute().item()
    one_shot = M.nll(logp, target).item()
    assert one_shot == pytest.approx(reference, rel=1e-9)
    assert chunked == pytest.approx(one_shot, rel=1e-9)
    assert chunked == pytest.approx(reference, rel=1e-9)
    # the same accumulation with float32 state would not pass (so the test can fail)
    acc32 = torch.zeros((), dtype=torch.float32)
    for chunk in tiny.split(rows):
        acc32 += chunk.sum().float()
    assert abs(acc32.item() / tiny.numel() - reference) / reference > 1e-9


def test_states_stay_float64_under_module_to_dtype():
    holder = torch.nn.Module()
    holder.nll = M.NLL()
    holder.rb = M.ReliabilityBins()
    holder.cm = M.CalibrationMetrics(4)
    holder.to(torch.bfloat16)  # what Lightning's bf16-true / 16-true plugins do
    holder.half()
    assert holder.nll.nll_sum.dtype == torch.float64
    assert holder.rb.bin_count.dtype == torch.float64
    assert holder.cm["brier"].brier_sum.dtype == torch.float64
    assert holder.cm.reliability.bin_conf_sum.dtype == torch.float64
    logp, t = _random_data(100, 4)
    holder.nll.update(logp.bfloat16(), t)
    assert holder.nll.compute().dtype == torch.float64


# ------------------------------------------------------- metric classes vs functional twins


def test_metrics_match_functional_twins_in_chunks():
    v = 9
    logp, target = _random_data(1500, v, seed=10)
    exact = torch.distributions.Dirichlet(torch.ones(v, dtype=torch.float64)).sample((1500,))
    mask = torch.rand(1500, generator=_gen(10)) > 0.2
    chunks = [slice(0, 400), slice(400, 1100), slice(1100, 1500)]

    nll_m, brier_m, gap_m, rb = M.NLL(), M.Brier(), M.BayesGapBits(), M.ReliabilityBins()
    ece_m = M.TopLabelCalibrationError(v, norm="l1")
    mce_m = M.TopLabelCalibrationError(v, norm="max")
    acc_m = M.TopLabelAccuracy(v)
    nll_masked = M.NLL()
    for sl in chunks:
        nll_m.update(logp[sl], target[sl])
        brier_m.update(logp[sl], target[sl])
        gap_m.update(logp[sl], exact[sl])
        rb.update(logp[sl], target[sl])
        ece_m.update(logp[sl], target[sl])
        mce_m.update(logp[sl], target[sl])
        acc_m.update(logp[sl], target[sl])
        nll_masked.update(logp[sl], target[sl], mask[sl])

    assert nll_m.compute().item() == pytest.approx(M.nll(logp, target).item(), rel=1e-13)
    assert brier_m.compute().item() == pytest.approx(M.brier(logp, target).item(), rel=1e-13)
    assert gap_m.compute().item() == pytest.approx(M.bayes_gap_bits(logp, exact).item(), rel=1e-13)
    assert nll_masked.compute().item() == pytest.approx(M.nll(logp, target, mask).item(), rel=1e-13)
    bins = M.reliability_bins(logp, target)
    out = rb.compute()
    for name, arr in zip(("count", "conf_sum", "correct_sum"), bins):
        state = {"count": rb.bin_count, "conf_sum": rb.bin_conf_sum, "correct_sum": rb.bin_correct_sum}[name]
        torch.testing.assert_close(state, arr, atol=1e-12, rtol=0)
    assert ece_m.compute().item() == pytest.approx(M.expected_calibration_error(logp, target).item(), abs=1e-6)
    assert mce_m.compute().item() == pytest.approx(M.expected_calibration_error(logp, target, norm="max").item(), abs=1e-6)
    assert ece_m.compute().item() == pytest.approx(out["ece"].item(), abs=1e-6)
    assert acc_m.compute().item() == pytest.approx(
        multiclass_accuracy(logp, target, v, average="micro").item(), abs=1e-7
    )


def test_calibration_metrics_collection():
    v = 5
    logp, target = _random_data(900, v, seed=11)
    cm = M.CalibrationMetrics(v, prefix="val/")
    batch_values = [cm(logp[i : i + 300], target[i : i + 300]) for i in range(0, 900, 300)]
    assert set(batch_values[0]) == {"val/nll", "val/brier", "val/ece", "val/mce", "val/acc"}
    assert batch_values[1]["val/nll"].item() == pytest.approx(M.nll(logp[300:600], target[300:600]).item(), rel=1e-12)
    assert batch_values[2]["val/ece"].item() == pytest.approx(_tm_ece(logp[600:], target[600:]).item(), abs=1e-6)
    out = cm.compute()
    assert out["val/nll"].item() == pytest.approx(M.nll(logp, target).item(), rel=1e-12)
    assert out["val/brier"].item() == pytest.approx(M.brier(logp, target).item(), rel=1e-12)
    assert out["val/ece"].item() == pytest.approx(_tm_ece(logp, target).item(), abs=1e-6)
    assert out["val/mce"].item() == pytest.approx(_tm_ece(logp, target, norm="max").item(), abs=1e-6)
    assert out["val/mce"].item() >= out["val/ece"].item()
    assert out["val/acc"].item() == pytest.approx(multiclass_accuracy(logp, target, v, average="micro").item(), abs=1e-7)
    rel = cm.reliability.compute()
    assert rel["count"].sum().item() == 900.0
    assert rel["ece"].item() == pytest.approx(out["val/ece"].item(), abs=1e-6)
    assert "reliability" not in cm.keys(keep_base=True)  # compute() / log_dict see scalars only
    # update with [B, T, V] and a mask
    cm.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute() before update()
        assert cm.reliability.compute()["count"].sum().item() == 0.0
    mask = torch.rand(900, generator=_gen(11)) > 0.3
    cm.update(logp.reshape(30, 30, v), target.reshape(30, 30), mask.reshape(30, 30))
    out = cm.compute()
    assert out["val/nll"].item() == pytest.approx(M.nll(logp[mask], target[mask]).item(), rel=1e-12)
    assert out["val/ece"].item() == pytest.approx(_tm_ece(logp[mask], target[mask]).item(), abs=1e-6)
    assert cm.reliability.compute()["count"].sum().item() == float(mask.sum())


def test_sum_states_under_simulated_two_process_sync():
    def fake_gather(tensor, group=None):  # two ranks holding identical states
        return [tensor, tensor.clone()]

    v = 4
    logp, target = _random_data(200, v, seed=12)
    kw = {"dist_sync_fn": fake_gather, "distributed_available_fn": lambda: True}
    nll_m, rb = M.NLL(**kw), M.ReliabilityBins(**kw)
    ece_m = M.TopLabelCalibrationError(v, **kw)
    nll_m.update(logp, target)
    rb.update(logp, target)
    ece_m.update(logp, target)
    assert nll_m.compute().item() == pytest.approx(M.nll(logp, target).item(), rel=1e-13)
    out = rb.compute()
    assert out["count"].sum().item() == 400.0
    assert out["ece"].item() == pytest.approx(_tm_ece(logp, target).item(), abs=1e-6)
    assert ece_m.compute().item() == pytest.approx(_tm_ece(logp, target).item(), abs=1e-6)
    # every rank empty: still no exception, documented values
    empty_ece = M.TopLabelCalibrationError(v, **kw)
    empty_ece.update(logp[:0], target[:0])
    assert empty_ece.compute().item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert M.TopLabelCalibrationError(v, **kw).compute().item() == 0.0
        assert torch.isnan(M.NLL(**kw).compute())


# ---------------------------------------------------------------------------------- plots


def test_reliability_diagram_and_save(tmp_path):
    logp, target = _random_data(1000, 6, seed=13)
    rb = M.ReliabilityBins()
    rb.update(logp, target)
    bins = rb.compute()
    fig = reliability_diagram(bins, title="val reliability")
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    legend_texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("ECE = ") for t in legend_texts)
    path = save_figure(fig, tmp_path / "run" / "plots" / "reliability.png")
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = figure_to_rgb_array(fig)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_reliability_diagram_empty_bins_and_no_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rb = M.ReliabilityBins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = reliability_diagram(rb.compute())  # nothing seen: every bin empty
    assert len(fig.axes) == 2
    assert plt.get_fignums() == before  # not registered with pyplot
    path = save_figure(fig, tmp_path / "empty.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
