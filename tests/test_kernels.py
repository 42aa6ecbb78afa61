"""Triton kernels (bayestrain.kernels) against the float64 PyTorch reference.

Run in its own process (``pytest -m kernels tests/test_kernels.py``): without CUDA, Triton
must run in interpreter mode, and ``TRITON_INTERPRET`` is read when triton is first imported.
On CPU the cases are fp32 with small shapes (the interpreter costs about a millisecond per
program per pass); on CUDA the same cases run on the GPU, plus bf16/fp16 and longer
sequences.

Every output buffer the kernels write is poisoned with NaN first
(``BAYESTRAIN_KERNELS_POISON=1``), so the finiteness checks below also check that every
element was written.  (``dq`` is the exception: it is accumulated with atomics into a zeroed
buffer.)
"""
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("BAYESTRAIN_KERNELS_POISON", "1")

pytest.importorskip("triton")

import bayestrain.attention as torch_attention  # noqa: E402
from bayestrain.kernels import (  # noqa: E402
    sinkhorn_attention,
    sinkhorn_attention_ref,
    softmax_attention,
    softmax_attention_ref,
)
from bayestrain.kernels.softmax import new_buffer  # noqa: E402

pytestmark = pytest.mark.kernels

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# pairwise-covering case lists (every pair of factor values occurs in some case; checked below)
# ---------------------------------------------------------------------------------------------
SINKHORN_FACTORS = {
    "N": [1, 17, 64, 100, 257],
    "D": [16, 64],
    "layout": ["bidir", "set"],
    "pad": [False, True],
    "weights": [False, True],
    "n_iters": [0, 1, 3],
    "bh": [(1, 2), (2, 1)],
}
SINKHORN_CASES = [
    (1, 16, "bidir", False, False, 0, (1, 2)),
    (1, 16, "bidir", True, True, 1, (2, 1)),
    (1, 64, "set", False, False, 3, (1, 2)),
    (17, 16, "set", True, True, 0, (1, 2)),
    (17, 64, "bidir", False, False, 3, (2, 1)),
    (17, 64, "set", False, False, 1, (1, 2)),
    (64, 16, "bidir", False, True, 3, (2, 1)),
    (64, 16, "bidir", True, False, 0, (1, 2)),
    (64, 64, "set", True, False, 1, (1, 2)),
    (100, 16, "set", False, False, 0, (1, 2)),
    (100, 16, "set", False, False, 1, (2, 1)),
    (100, 64, "bidir", True, True, 3, (1, 2)),
    (257, 16, "set", True, True, 1, (1, 2)),
    (257, 64, "bidir", False, False, 0, (2, 1)),
    (257, 64, "set", True, False, 3, (1, 2)),
]
SOFTMAX_FACTORS = {
    "N": [1, 17, 64, 100, 257],
    "D": [16, 64],
    "layout": ["bidir", "set", "causal"],
    "pad": [False, True],
    "weights": [False, True],
    "bh": [(1, 2), (2, 1)],
}
SOFTMAX_CASES = [
    (1, 16, "bidir", True, True, (2, 1)),
    (1, 16, "causal", True, False, (1, 2)),
    (1, 64, "set", False, False, (1, 2)),
    (17, 16, "causal", False, True, (1, 2)),
    (17, 64, "bidir", True, False, (2, 1)),
    (17, 64, "set", True, False, (1, 2)),
    (64, 16, "set", False, True, (1, 2)),
    (64, 64, "bidir", False, True, (1, 2)),
    (64, 64, "causal", True, False, (2, 1)),
    (100, 16, "set", True, False, (2, 1)),
    (100, 64, "bidir", False, True, (1, 2)),
    (100, 64, "causal", False, False, (2, 1)),
    (257, 16, "causal", False, True, (2, 1)),
    (257, 64, "bidir", True, False, (1, 2)),
    (257, 64, "set", False, False, (1, 2)),
]


def _case_id(case):
    return "-".join(
        f"{x[0]}x{x[1]}" if isinstance(x, tuple) else ("pad" if x is True else "nopad" if x is False else str(x))
        for x in case
    )


@pytest.mark.parametrize(
    "factors, cases", [(SINKHORN_FACTORS, SINKHORN_CASES), (SOFTMAX_FACTORS, SOFTMAX_CASES)]
)
def test_case_lists_are_pairwise_covering(factors, cases):
    names = list(factors)
    for case in cases:
        assert len(case) == len(names)
        for name, value in zip(names, case):
            assert value in factors[name], (name, value)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(c[i], c[j]) for c in cases}
        missing = [(x, y) for x in factors[a] for y in factors[b] if (x, y) not in seen]
        assert not missing, f"pairs of ({a}, {b}) not covered: {missing}"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _blocks(n):
    """Multi-tile coverage at moderate N; the interpreter default (<= 64) elsewhere."""
    return (32, 32) if n in (64, 100) else (None, None)


def _make(N, D, layout, pad, weights, bh, seed, kind, dtype=torch.float32):
    B, H = bh
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    kpm = None
    if pad:
        kpm = torch.rand(B, N, generator=g) < 0.3
        kpm[:, 0] = False  # at least one valid position per sequence
        if N > 1:
            kpm[-1, -1] = True  # at least one padded position
        if N > 40:
            kpm[0, 33:38] = True
    n_context = None
    if layout == "set":
        n_context = torch.randint(1, N + 1, (B,), generator=g)
        if B == 2 and N > 2:
            n_context[1] = N // 2
    lw = lp = None
    if weights:
        shape = [(N,), (B, N), (B, H, N)][N % 3]
        lw = 0.5 * torch.randn(*shape, generator=g)
        if N > 2:
            lw[..., 1] = float("-inf")  # a valid query with rho = 0
        if kind == "sinkhorn":
            lp = 0.5 * torch.randn(*[(N,), (B, N), (B, H, N)][(N + 1) % 3], generator=g)
    out = dict(q=q, k=k, v=v, kpm=kpm, n_context=n_context, lw=lw, lp=lp)
    for name in ("q", "k", "v"):
        out[name] = out[name].to(DEV, dtype)
    for name in ("lw", "lp"):
        if out[name] is not None:
            out[name] = out[name].to(DEV)
    for name in ("kpm", "n_context"):
        if out[name] is not None:
            out[name] = out[name].to(DEV)
    return out


def _close(a, b, name, rtol=RTOL, atol=1e-6):
    """max |a - b| <= rtol * max |b| + atol.  The absolute floor (inputs are O(1)) covers
    quantities that vanish exactly in the reference, e.g. dq at N = 1, where the kernel returns
    fp32 rounding noise of O(1) terms that cancel."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an element not written?)"
    assert torch.isfinite(b).all(), f"{name}: the reference is not finite"
    if a.numel() == 0:
        return
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max abs err {err:.3e}, reference scale {scale:.3e}"


def _leaves(inp, names, dtype=None):
    out = []
    for n in names:
        t = inp[n]
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        out.append(t.requires_grad_())
    return out


def _run_sinkhorn(inp, n_iters, ref=False, dtype=torch.float64, blocks=(None, None), seed=1):
    q, k, v, lp, lw = _leaves(inp, ["q", "k", "v", "lp", "lw"], dtype if ref else None)
    if ref:
        out, kl = sinkhorn_attention_ref(q, k, v, lp, lw, inp["kpm"], inp["n_context"], n_iters, dtype=dtype)
    else:
        out, kl = sinkhorn_attention(
            q, k, v, lp, lw, inp["kpm"], inp["n_context"], n_iters, block_m=blocks[0], block_n=blocks[1]
        )
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gk = torch.randn(kl.shape, generator=g).to(kl.device, kl.dtype)
    leaves = [x for x in (q, k, v, lp, lw) if x is not None]
    grads = torch.autograd.grad((out * go).sum() + (kl * gk).sum(), leaves)
    return out, kl, grads


def _run_softmax(inp, causal, ref=False, dtype=torch.float64, blocks=(None, None), seed=1):
    q, k, v, lw = _leaves(inp, ["q", "k", "v", "lw"], dtype if ref else None)
    if ref:
        out, mu = softmax_attention_ref(q, k, v, lw, inp["kpm"], inp["n_context"], causal, dtype=dtype)
    else:
        out, mu = softmax_attention(
            q, k, v, lw, inp["kpm"], inp["n_context"], causal, block_m=blocks[0], block_n=blocks[1]
        )
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gm = torch.randn(mu.shape, generator=g).to(mu.device, mu.dtype)
    leaves = [x for x in (q, k, v, lw) if x is not None]
    grads = torch.autograd.grad((out * go).sum() + (mu * gm).sum(), leaves)
    return out, mu, grads


GRAD_NAMES = ["dq", "dk", "dv", "dlog_prior", "dlog_query_weights"]


# ---------------------------------------------------------------------------------------------
# fp32 against the float64 reference (CPU interpreter, or CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", SINKHORN_CASES, ids=_case_id)
def test_sinkhorn_matches_reference(case):
    N, D, layout, pad, weights, n_iters, bh = case
    inp = _make(N, D, layout, pad, weights, bh, seed=N * 7 + D, kind="sinkhorn")
    out, kl, grads = _run_sinkhorn(inp, n_iters, blocks=_blocks(N))
    rout, rkl, rgrads = _run_sinkhorn(inp, n_iters, ref=True)
    _close(out, rout, "out")
    _close(kl, rkl, "kl (residual)", atol=2e-7)  # fp32 log laws: ~1e-7 absolute floor
    names = [n for n, t in zip(GRAD_NAMES, (1, 1, 1, inp["lp"], inp["lw"])) if t is not None]
    for name, a, b in zip(names, grads, rgrads):
        _close(a, b, name)
    if inp["kpm"] is not None:  # padded rows output zeros, padded keys get no gradient
        pad = inp["kpm"][:, None, :, None].expand_as(out)
        assert (out[pad] == 0).all()
        assert (grads[1][pad] == 0).all() and (grads[2][pad] == 0).all()


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_case_id)
def test_softmax_matches_reference(case):
    N, D, layout, pad, weights, bh = case
    inp = _make(N, D, layout, pad, weights, bh, seed=N * 11 + D, kind="softmax")
    causal = layout == "causal"
    out, mu, grads = _run_softmax(inp, causal, blocks=_blocks(N))
    rout, rmu, rgrads = _run_softmax(inp, causal, ref=True)
    _close(out, rout, "out")
    _close(mu, rmu, "mu (key marginal)")
    names = [n for n, t in zip(GRAD_NAMES[:3] + GRAD_NAMES[4:], (1, 1, 1, inp["lw"])) if t is not None]
    for name, a, b in zip(names, grads, rgrads):
        _close(a, b, name)


def test_softmax_causal_with_context():
    """causal and n_context together (the prefix of a set layout seen causally)."""
    inp = _make(40, 16, "set", True, True, (2, 1), seed=3, kind="softmax")
    out, mu, grads = _run_softmax(inp, True, blocks=(16, 16))
    rout, rmu, rgrads = _run_softmax(inp, True, ref=True)
    _close(out, rout, "out")
    _close(mu, rmu, "mu")
    for name, a, b in zip(["dq", "dk", "dv", "dlw"], grads, rgrads):
        _close(a, b, name)


def test_sinkhorn_five_iterations_multi_tile():
    inp = _make(48, 16, "bidir", True, True, (1, 1), seed=5, kind="sinkhorn")
    out, kl, grads = _run_sinkhorn(inp, 5, blocks=(16, 32))
    rout, rkl, rgrads = _run_sinkhorn(inp, 5, ref=True)
    _close(out, rout, "out")
    _close(kl, rkl, "kl", atol=2e-7)
    for name, a, b in zip(GRAD_NAMES, grads, rgrads):
        _close(a, b, name)


def test_sinkhorn_residual_decreases_with_iterations():
    inp = _make(64, 16, "bidir", False, False, (1, 1), seed=9, kind="sinkhorn")
    kls = [sinkhorn_attention(inp["q"], inp["k"], inp["v"], n_iters=n)[1].item() for n in (0, 1, 3)]
    assert kls[0] > kls[1] > kls[2] >= 0.0, kls


# ---------------------------------------------------------------------------------------------
# robustness: large scores, fully masked tiles, empty sequences
# ---------------------------------------------------------------------------------------------
def _masked_tiles_input(scale):
    """N = 128 in 32-wide tiles: batch 0 pads a whole tile of keys and queries (32..63) and has
    targets in the last tile only; batch 1 has a 20-long context (tiles 1..3 see no key)."""
    N, D = 128, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 1, N, D, generator=g) for _ in range(3))
    q, k = q * scale, k * scale
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[0, 32:64] = True
    kpm[1, 100:] = True
    n_context = torch.tensor([96, 20])
    return dict(q=q.to(DEV), k=k.to(DEV), v=v.to(DEV), kpm=kpm.to(DEV), n_context=n_context.to(DEV),
                lw=None, lp=None)


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["unit", "scores1e4"])
def test_masked_tiles_and_large_scores(scale):
    inp = _masked_tiles_input(scale)
    s = (inp["q"].double() @ inp["k"].double().transpose(-1, -2)).abs().max() / 4
    assert s > (5e3 if scale > 1 else 0)
    for n_iters in (0, 3):
        out, kl, grads = _run_sinkhorn(inp, n_iters, blocks=(32, 32))
        for name, t in [("out", out), ("kl", kl)] + list(zip(GRAD_NAMES, grads)):
            assert torch.isfinite(t).all(), f"sinkhorn n_iters={n_iters}: {name} not finite"
        assert (out[0, :, 32:64] == 0).all() and (grads[2][0, :, 32:64] == 0).all()
        if scale == 1.0:
            rout, rkl, rgrads = _run_sinkhorn(inp, n_iters, ref=True)
            _close(out, rout, "out")
            _close(kl, rkl, "kl", atol=2e-7)
            for name, a, b in zip(GRAD_NAMES, grads, rgrads):
                _close(a, b, name)
    for causal in (False, True):
        out, mu, grads = _run_softmax(inp, causal, blocks=(32, 32))
        for name, t in [("out", out), ("mu", mu)] + list(zip(GRAD_NAMES, grads)):
            assert torch.isfinite(t).all(), f"softmax causal={causal}: {name} not finite"
        rout, rmu, rgrads = _run_softmax(inp, causal, ref=True)
        if scale == 1.0:
            _close(out, rout, "out")
            _close(mu, rmu, "mu")
            for name, a, b in zip(GRAD_NAMES, grads, rgrads):
                _close(a, b, name)
        else:  # one-hot rows; fp32 rounding of 1e4-sized scores moves values, not the argmax
            _close(out, rout, "out (large scores)", rtol=1e-2)


def test_empty_sequences():
    """A fully padded sequence and a set layout with n_context = 0: zero outputs, zero
    residual, zero (finite) gradients."""
    N, D = 20, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 1, N, D, generator=g).to(DEV) for _ in range(3))
    kpm = torch.zeros(2, N, dtype=torch.bool, device=DEV)
    kpm[0] = True
    inp = dict(q=q, k=k, v=v, kpm=kpm, n_context=torch.tensor([N, 0], device=DEV), lw=None, lp=None)
    out, kl, grads = _run_sinkhorn(inp, 2)
    assert (out == 0).all() and (kl == 0).all()
    assert all(torch.isfinite(t).all() and (t == 0).all() for t in grads)
    out, mu, grads = _run_softmax(inp, False)
    assert (out == 0).all() and (mu == 0).all()
    assert all(torch.isfinite(t).all() and (t == 0).all() for t in grads)


def test_zero_prior_mass_on_a_visible_key(monkeypatch):
    """pi_j = 0 on a key that weighted queries see: g_j = -inf, the key gets no weight.  The
    reference's masked_logsumexp backward is NaN on an all -inf slice (here: the key marginal
    of that key); compare against it with -inf entries treated as masked."""
    inp = _make(24, 16, "bidir", False, False, (1, 1), seed=4, kind="sinkhorn")
    lp = torch.zeros(24, device=DEV)
    lp[[3, 10]] = float("-inf")
    inp["lp"] = lp
    out, kl, grads = _run_sinkhorn(inp, 3)
    assert all(torch.isfinite(t).all() for t in grads)
    orig = torch_attention.masked_logsumexp
    monkeypatch.setattr(
        torch_attention, "masked_logsumexp", lambda x, mask, dim: orig(x, mask & ~torch.isneginf(x), dim)
    )
    rout, rkl, rgrads = _run_sinkhorn(inp, 3, ref=True)
    _close(out, rout, "out")
    _close(kl, rkl, "kl", atol=2e-7)
    for name, a, b in zip(GRAD_NAMES, grads, rgrads):
        if name == "dlog_prior":  # -inf entries: no gradient in either
            a, b = a[torch.isfinite(lp)], b[torch.isfinite(lp)]
        _close(a, b, name)


def test_gradients_through_one_output_only():
    """out alone, kl / mu alone: the unused output's backward is skipped, the rest is exact."""
    inp = _make(30, 16, "set", True, True, (1, 1), seed=8, kind="sinkhorn")
    q, k, v, lp, lw = _leaves(inp, ["q", "k", "v", "lp", "lw"])
    rq, rk, rv, rlp, rlw = _leaves(inp, ["q", "k", "v", "lp", "lw"], torch.float64)
    out, kl = sinkhorn_attention(q, k, v, lp, lw, inp["kpm"], inp["n_context"], 2)
    rout, rkl = sinkhorn_attention_ref(rq, rk, rv, rlp, rlw, inp["kpm"], inp["n_context"], 2)
    for a, b, name in ((out.sum(), rout.sum(), "out"), (kl.sum(), rkl.sum(), "kl")):
        ga = torch.autograd.grad(a, (q, k, v, lp, lw), retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad(b, (rq, rk, rv, rlp, rlw), retain_graph=True, allow_unused=True)
        for n, x, y, leaf in zip(GRAD_NAMES, ga, gb, (q, k, v, lp, lw)):
            x = torch.zeros_like(leaf) if x is None else x  # kl does not depend on v
            y = torch.zeros_like(leaf, dtype=torch.float64) if y is None else y
            _close(x, y, f"{name}: {n}")
    out, mu = softmax_attention(q, k, v, lw, inp["kpm"], inp["n_context"])
    rout, rmu = softmax_attention_ref(rq, rk, rv, rlw, inp["kpm"], inp["n_context"])
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(rout.sum(), (rq, rk, rv))
    for n, x, y in zip(GRAD_NAMES, ga, gb):
        _close(x, y, f"softmax out: {n}")


def test_strided_inputs_and_odd_head_dims():
    """q, k, v as transposed views of [B, N, H, D] (a fused projection's layout), D = 24
    (padded to 32 inside the kernel) and a value dim of 40."""
    g = torch.Generator().manual_seed(6)
    B, N, H = 1, 21, 2
    q, k = (torch.randn(B, N, H, 24, generator=g).to(DEV).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, N, H, 40, generator=g).to(DEV).transpose(1, 2)
    assert not q.is_contiguous()
    kpm = torch.zeros(B, N, dtype=torch.bool, device=DEV)
    kpm[0, -3:] = True
    inp = dict(q=q, k=k, v=v, kpm=kpm, n_context=None, lw=None, lp=None)
    out, kl, grads = _run_sinkhorn(inp, 2, blocks=(16, 16))
    rout, rkl, rgrads = _run_sinkhorn(inp, 2, ref=True)
    _close(out, rout, "out")
    _close(kl, rkl, "kl", atol=2e-7)
    for name, a, b in zip(GRAD_NAMES, grads, rgrads):
        _close(a, b, name)
    inp["n_context"] = torch.tensor([15], device=DEV)
    out, mu, grads = _run_softmax(inp, True, blocks=(16, 16))
    rout, rmu, rgrads = _run_softmax(inp, True, ref=True)
    _close(out, rout, "out")
    _close(mu, rmu, "mu")
    for name, a, b in zip(GRAD_NAMES, grads, rgrads):
        _close(a, b, name)


def test_poison_hook_and_validation():
    assert os.environ.get("BAYESTRAIN_KERNELS_POISON") == "1"
    assert torch.isnan(new_buffer((3,), DEV)).all()
    q = torch.randn(1, 1, 8, 16, device=DEV)
    with pytest.raises(TypeError, match="float64"):
        sinkhorn_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="key_padding_mask"):
        softmax_attention(q, q, q, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_attention(q, q, q, n_iters=-1)
    with pytest.raises(ValueError, match="n_context"):
        sinkhorn_attention(q, q, q, n_context=torch.tensor([1, 2], device=DEV))
    with pytest.raises(ValueError, match="block"):
        softmax_attention(q, q, q, block_m=24)


def test_bench_script_tiny():
    env = dict(os.environ)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_attention.py"), "--tiny"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sinkhorn n_iters=3" in res.stdout and "softmax+mu" in res.stdout, res.stdout
    assert "TFLOP/s" in res.stdout


# ---------------------------------------------------------------------------------------------
# CUDA only: half precision, the autotuned path, agreement with the torch backend
# ---------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N, D, layout, pad", [(1000, 64, "bidir", True), (777, 128, "set", False),
                                               (2048, 32, "bidir", False)])
def test_cuda_half_precision(dtype, N, D, layout, pad):
    inp = _make(N, D, layout, pad, True, (2, 2), seed=N, kind="sinkhorn", dtype=dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    out, kl, grads = _run_sinkhorn(inp, 3)
    rout, rkl, rgrads = _run_sinkhorn(inp, 3, ref=True)
    _close(out.float(), rout, "out", rtol=tol)
    _close(kl, rkl, "kl", rtol=tol, atol=1e-4)
    for name, a, b in zip(GRAD_NAMES, grads, rgrads):
        _close(a.float(), b, name, rtol=5 * tol)
    # the torch backend in the same dtype agrees at least as well with float64
    tout, tkl = sinkhorn_attention_ref(
        inp["q"], inp["k"], inp["v"], inp["lp"], inp["lw"], inp["kpm"], inp["n_context"], 3, dtype=None
    )
    _close(out.float(), tout.float(), "out vs torch backend", rtol=tol)
    for causal in (False, True):
        out, mu, grads = _run_softmax(inp, causal)
        rout, rmu, rgrads = _run_softmax(inp, causal, ref=True)
        _close(out.float(), rout, "softmax out", rtol=tol)
        _close(mu, rmu, "mu", rtol=tol)
        for name, a, b in zip(["dq", "dk", "dv", "dlw"], grads, rgrads):
            _close(a.float(), b, name, rtol=5 * tol)


@cuda_only
def test_cuda_sdpa_agreement_and_no_quadratic_memory():
    B, H, N, D = 1, 4, 8192, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, _ = softmax_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out.float() - ref.float()).abs().max() < 2e-2
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q.requires_grad_()
    out, kl = sinkhorn_attention(q, k, v, n_iters=3)
    (out.float().sum() + kl.sum()).backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < B * H * N * N * 2 / 8, f"peak {peak / 2**20:.0f} MiB looks quadratic"
    assert math.isfinite(kl.sum().item())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
