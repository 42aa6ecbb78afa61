"""Fused softmax attention that also returns its key marginal ``mu_j = sum_i rho_i A_ij``.

This module holds the tiled Triton passes that both attentions use (Sinkhorn attention,
``bayestrain.kernels.sinkhorn``, is a chain of the same passes with a key bias):

* ``_softmax_marginal_fwd_kernel`` -- row-parallel flash pass over key tiles: online
  log-sum-exp of ``S_ij + c_j`` (``c``: a key bias, ``-inf`` on keys that cannot be seen),
  optionally applying ``V``; writes the row log-normaliser ``lse_i`` and optionally the row
  potential ``f_i = log rho_i - lse_i``.
* ``_softmax_marginal_col_kernel`` -- column-parallel pass over query tiles: online
  log-sum-exp over queries of ``a_i + S_ij + c_j``; gives ``log mu_j`` (``a = f``) and the
  Sinkhorn column update (optionally ``g_j = log pi_j - lse_j``).
* ``_softmax_marginal_wsum_row_kernel`` / ``_softmax_marginal_wsum_col_kernel`` -- weighted
  sums ``sum_j w_j exp(a_i + S_ij + c_j)`` (by rows) or ``sum_i w_i exp(...)`` (by columns):
  the adjoints of the log-sum-exp passes.
* ``_softmax_marginal_bwd_kernel`` -- column-parallel flash backward (``dv``, ``dk``, ``dq`` by
  fp32 atomics) with a key bias, through both ``out`` and ``mu``; it can also return the
  column sums of ``dZ`` (the gradient of the key bias) and add the Sinkhorn half-iteration
  terms of ``dS`` (``SINKHORN``).

``S_ij = q_i . k_j / sqrt(D)`` is recomputed tile by tile; nothing of size ``N x N`` is ever
stored.  Masks are carried as O(N) vectors: a row bias (``-inf`` on padded rows), a key bias
(``-inf`` on padded keys and keys ``j >= n_context``), a per-batch ``n_context`` (loop bound),
and an optional causal predicate ``j <= i``.  All accumulation is in fp32.

Conventions match ``bayestrain.attention`` (the float64 reference): padded rows output zeros,
``rho`` is uniform over the valid queries (in the ``set`` layout: the valid context queries),
keys no query sees carry no mass.
"""
from __future__ import annotations

import math
import os

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["softmax_attention", "softmax_attention_ref", "SoftmaxMarginalFunction"]

NEG_INF = float("-inf")
POISON_ENV = "BAYESTRAIN_KERNELS_POISON"


# --------------------------------------------------------------------------------------------
# launch utilities (shared with sinkhorn.py)
# --------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no")


def new_buffer(shape, device, dtype=torch.float32) -> Tensor:
    """Output buffer; filled with NaN when ``BAYESTRAIN_KERNELS_POISON=1`` (test hook: every
    element a kernel should write is then checked to have been written)."""
    if os.environ.get(POISON_ENV, "0") not in ("", "0"):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pick_blocks(n: int, block_m: int | None, block_n: int | None):
    """``(BLOCK_M, BLOCK_N)`` or ``None`` (autotuned, CUDA only).  Under the interpreter the
    blocks are fixed and wide (the interpreter costs per program, not per element)."""
    if block_m is not None or block_n is not None:
        bm = block_m or block_n
        bn = block_n or block_m
        for b in (bm, bn):
            if b < 16 or b & (b - 1):
                raise ValueError(f"block sizes must be powers of two >= 16, got {bm}, {bn}")
        return bm, bn
    if interpreting():
        b = min(64, max(16, _pow2(n)))
        return b, b
    return None


def _cfgs(shapes):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


# row-parallel passes (BLOCK_M resident, loop over BLOCK_N key tiles)
_ROW_CONFIGS = _cfgs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)])
# column-parallel reductions (BLOCK_N resident, loop over BLOCK_M query tiles)
_COL_CONFIGS = _cfgs([(64, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)])
# column-parallel backward (dk, dv accumulators resident)
_BWD_CONFIGS = _cfgs([(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2)])


class _Kernel:
    """A jit kernel and, on CUDA, its autotuned twin (fixed blocks under the interpreter or
    when the caller gives block sizes)."""

    def __init__(self, fn, configs, key, reset_to_zero=None):
        self.fn = fn
        self.tuned = None
        if not interpreting():
            self.tuned = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(fn)

    def __call__(self, grid, blocks, *args, **kwargs):
        if blocks is None and self.tuned is not None:
            self.tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kwargs)
        else:
            bm, bn = blocks if blocks is not None else (64, 64)
            extra = {} if interpreting() else {"num_warps": 4, "num_stages": 2}
            self.fn[grid(bm, bn)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, **extra)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (torch's default for matmul), not TF32
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _softmax_marginal_fwd_kernel(
    Q, K, V, O, RB, C, LR, RL, F, NCTX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, N, D, DV, sm_scale,
    CAUSAL: tl.constexpr, HAS_V: tl.constexpr, HAS_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    """Row pass: lse_i = logsumexp_j (rb_i + S_ij + c_j) [j <= i if CAUSAL]; with HAS_V also
    out_i = sum_j exp(rb_i + S_ij + c_j - lse_i) v_j (zero for rows that see nothing); with
    HAS_F also f_i = lr_i - lse_i (-inf where lr_i or lse_i is -inf)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    vec = pid_bh * N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    rb = tl.load(RB + vec + offs_m, mask=row_ok, other=float("-inf"))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    hi = tl.minimum(tl.load(NCTX + b), N)  # keys >= n_context are never visible
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * sm_scale
        c = tl.load(C + vec + offs_n, mask=col_ok, other=float("-inf"))
        x = s + rb[:, None] + c[None, :]
        if CAUSAL:
            x = tl.where(offs_n[None, :] <= offs_m[:, None], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(x - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(RL + vec + offs_m, lse, mask=row_ok)
    if HAS_F:
        lr = tl.load(LR + vec + offs_m, mask=row_ok, other=float("-inf"))
        f = tl.where(seen & (lr > float("-inf")), lr - tl.where(seen, lse, 0.0), float("-inf"))
        tl.store(F + vec + offs_m, f, mask=row_ok)
    if HAS_V:
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        out = tl.where(seen[:, None], out, 0.0)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _softmax_marginal_col_kernel(
    Q, K, A, C, LP, CL, G, NCTX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    H, N, D, sm_scale,
    CAUSAL: tl.constexpr, HAS_G: tl.constexpr, QBOUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """Column pass: cl_j = logsumexp_i (a_i + S_ij + c_j) [i >= j if CAUSAL]; with HAS_G also
    g_j = lp_j - cl_j (-inf where cl_j is -inf).  QBOUND: only queries i < n_context carry
    a_i > -inf (the loop stops there)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    vec = pid_bh * N

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    c = tl.load(C + vec + offs_n, mask=col_ok, other=float("-inf"))

    m_j = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_j = tl.zeros([BLOCK_N], tl.float32)

    nctx = tl.load(NCTX + b)
    hi = N
    if QBOUND:
        hi = tl.minimum(nctx, N)
    hi = tl.where(pid_n * BLOCK_N >= nctx, 0, hi)  # keys beyond the context: nobody sees them
    lo = 0
    if CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qt = tl.load(Q + b * sqb + h * sqh + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        st = tl.dot(k, qt, input_precision=PREC) * sm_scale  # [BLOCK_N, BLOCK_M]
        a = tl.load(A + vec + offs_m, mask=row_ok, other=float("-inf"))
        x = st + c[:, None] + a[None, :]
        if CAUSAL:
            x = tl.where(offs_m[None, :] >= offs_n[:, None], x, float("-inf"))
        m_new = tl.maximum(m_j, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_j = l_j * tl.exp(m_j - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m_j = m_new

    seen = l_j > 0.0
    cl = tl.where(seen, m_j + tl.log(tl.where(seen, l_j, 1.0)), float("-inf"))
    tl.store(CL + vec + offs_n, cl, mask=col_ok)
    if HAS_G:
        lp = tl.load(LP + vec + offs_n, mask=col_ok, other=float("-inf"))
        g = tl.where(seen & (lp > float("-inf")), lp - tl.where(seen, cl, 0.0), float("-inf"))
        tl.store(G + vec + offs_n, g, mask=col_ok)


@triton.jit
def _softmax_marginal_wsum_row_kernel(
    Q, K, A, C, W, OUT, NCTX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    H, N, D, sm_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """out_i = sum_j w_j exp(a_i + S_ij + c_j) [j <= i if CAUSAL].  The callers pass
    normalised exponents (<= 0) and no +inf."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    vec = pid_bh * N

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    a = tl.load(A + vec + offs_m, mask=row_ok, other=float("-inf"))
    acc = tl.zeros([BLOCK_M], tl.float32)

    hi = tl.minimum(tl.load(NCTX + b), N)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * sm_scale
        c = tl.load(C + vec + offs_n, mask=col_ok, other=float("-inf"))
        w = tl.load(W + vec + offs_n, mask=col_ok, other=0.0)
        x = s + a[:, None] + c[None, :]
        if CAUSAL:
            x = tl.where(offs_n[None, :] <= offs_m[:, None], x, float("-inf"))
        acc += tl.sum(tl.exp(x) * w[None, :], 1)
    tl.store(OUT + vec + offs_m, acc, mask=row_ok)


@triton.jit
def _softmax_marginal_wsum_col_kernel(
    Q, K, A, C, W, OUT, NCTX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    H, N, D, sm_scale,
    CAUSAL: tl.constexpr, QBOUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """out_j = sum_i w_i exp(a_i + S_ij + c_j) [i >= j if CAUSAL]; QBOUND: w_i = 0 for
    i >= n_context."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    vec = pid_bh * N

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    c = tl.load(C + vec + offs_n, mask=col_ok, other=float("-inf"))
    acc = tl.zeros([BLOCK_N], tl.float32)

    nctx = tl.load(NCTX + b)
    hi = N
    if QBOUND:
        hi = tl.minimum(nctx, N)
    hi = tl.where(pid_n * BLOCK_N >= nctx, 0, hi)
    lo = 0
    if CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qt = tl.load(Q + b * sqb + h * sqh + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        st = tl.dot(k, qt, input_precision=PREC) * sm_scale
        a = tl.load(A + vec + offs_m, mask=row_ok, other=float("-inf"))
        w = tl.load(W + vec + offs_m, mask=row_ok, other=0.0)
        x = st + c[:, None] + a[None, :]
        if CAUSAL:
            x = tl.where(offs_m[None, :] >= offs_n[:, None], x, float("-inf"))
        acc += tl.sum(tl.exp(x) * w[None, :], 1)
    tl.store(OUT + vec + offs_n, acc, mask=col_ok)


@triton.jit
def _softmax_marginal_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, DB,
    RL, C, LR, WM, LMU, DELTA,
    SF, SCL, SWG, SG, SRL, SWF,
    NCTX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    H, N, D, DV_DIM, sm_scale, n_sk,
    CAUSAL: tl.constexpr, HAS_DMU: tl.constexpr,
    COMPUTE_DV: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DQK: tl.constexpr,
    SINKHORN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    """Column-parallel backward of out_i = sum_j A_ij v_j and mu_j = sum_i rho_i A_ij with
    A_ij = exp(S_ij + c_j - rl_i):
        dv_j = sum_i A_ij do_i;  dP_ij = do_i . v_j + rho_i dmu_j;
        dZ_ij = A_ij (dP_ij - delta_i), delta_i = sum_j A_ij dP_ij (given);
    the marginal term A_ij rho_i dmu_j is evaluated as wm_j exp(log A_ij + log rho_i - lmu_j)
    (HAS_DMU; softmax: wm = dmu, lmu = 0; Sinkhorn's residual: wm = -dKL pi_j, lmu = log mu_j,
    bounded where dmu = -dKL pi / mu overflows);
        db_j = sum_i dZ_ij (COMPUTE_DB: the gradient of the key bias c);
        dS = dZ (+ the Sinkhorn half-iteration terms, SINKHORN), dk = dS^T q, dq = dS k.
    Sinkhorn terms, t = 0..n_sk-1 (stacked vectors of stride N_BH = n_heads * N):
        column update t+1:  wg_j exp(f_i + S_ij - cl_j)   (wg = -dg_{t+1}, f = f_t)
        row update t:       wf_i exp(S_ij + g_j - rl_i)   (wf = -df_t,  g = g_t)
    cl / rl vectors carry +inf where the log-normaliser was -inf (the term then vanishes).
    dq is accumulated with fp32 atomics into a zeroed buffer."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N
    vec = pid_bh * N
    sk_stride = tl.num_programs(1) * N

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    c = tl.load(C + vec + offs_n, mask=col_ok, other=float("-inf"))
    if HAS_DMU:
        wm = tl.load(WM + vec + offs_n, mask=col_ok, other=0.0)
        lmu = tl.load(LMU + vec + offs_n, mask=col_ok, other=float("inf"))

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    db_acc = tl.zeros([BLOCK_N], tl.float32)

    nctx = tl.load(NCTX + b)
    hi = tl.where(pid_n * BLOCK_N >= nctx, 0, N)
    lo = 0
    if CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_dv[None, :] * sdod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
        rl = tl.load(RL + vec + offs_m, mask=row_ok, other=float("inf"))
        rl = tl.where(rl == float("-inf"), float("inf"), rl)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * sm_scale  # [BLOCK_N, BLOCK_M]
        xt = st + c[:, None] - rl[None, :]  # log A^T
        if CAUSAL:
            xt = tl.where(offs_m[None, :] >= offs_n[:, None], xt, float("-inf"))
        pt = tl.exp(xt)
        if COMPUTE_DV:
            dv_acc += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        if COMPUTE_DB or COMPUTE_DQK:
            delta = tl.load(DELTA + vec + offs_m, mask=row_ok, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            if HAS_DMU:
                lr = tl.load(LR + vec + offs_m, mask=row_ok, other=float("-inf"))
                dst += wm[:, None] * tl.exp(xt + lr[None, :] - lmu[:, None])
            if COMPUTE_DB:
                db_acc += tl.sum(dst, 1)
            if COMPUTE_DQK:
                if SINKHORN:
                    for t in range(n_sk):
                        base = t * sk_stride + vec
                        f = tl.load(SF + base + offs_m, mask=row_ok, other=float("-inf"))
                        cl = tl.load(SCL + base + offs_n, mask=col_ok, other=float("inf"))
                        wg = tl.load(SWG + base + offs_n, mask=col_ok, other=0.0)
                        dst += wg[:, None] * tl.exp(st + f[None, :] - cl[:, None])
                        g = tl.load(SG + base + offs_n, mask=col_ok, other=float("-inf"))
                        rlt = tl.load(SRL + base + offs_m, mask=row_ok, other=float("inf"))
                        wf = tl.load(SWF + base + offs_m, mask=row_ok, other=0.0)
                        dst += wf[None, :] * tl.exp(st + g[:, None] - rlt[None, :])
                dk_acc += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
                dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=PREC) * sm_scale
                tl.atomic_add(DQ + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq,
                              mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")

    if COMPUTE_DV:
        tl.store(DV + pid_bh * N * DV_DIM + offs_n[:, None] * DV_DIM + offs_dv[None, :], dv_acc,
                 mask=col_ok[:, None] & (offs_dv[None, :] < DV_DIM))
    if COMPUTE_DQK:
        tl.store(DK + pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :], dk_acc * sm_scale,
                 mask=col_ok[:, None] & (offs_d[None, :] < D))
    if COMPUTE_DB:
        tl.store(DB + vec + offs_n, db_acc, mask=col_ok)


_KEY = ["N", "D", "CAUSAL"]
fwd_kernel = _Kernel(_softmax_marginal_fwd_kernel, _ROW_CONFIGS, _KEY + ["DV", "HAS_V", "HAS_F"])
col_kernel = _Kernel(_softmax_marginal_col_kernel, _COL_CONFIGS, _KEY + ["HAS_G", "QBOUND"])
wsum_row_kernel = _Kernel(_softmax_marginal_wsum_row_kernel, _ROW_CONFIGS, _KEY)
wsum_col_kernel = _Kernel(_softmax_marginal_wsum_col_kernel, _COL_CONFIGS, _KEY + ["QBOUND"])
bwd_kernel = _Kernel(
    _softmax_marginal_bwd_kernel, _BWD_CONFIGS,
    _KEY + ["DV_DIM", "HAS_DMU", "COMPUTE_DV", "COMPUTE_DB", "COMPUTE_DQK", "SINKHORN"],
    reset_to_zero=["DQ"],
)


# --------------------------------------------------------------------------------------------
# host-side passes (all vectors: float32, contiguous [B*H, N])
# --------------------------------------------------------------------------------------------
class Geometry:
    """Shapes, strides and launch parameters shared by every pass of one call."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, nctx: Tensor, causal: bool, blocks):
        self.q, self.k, self.v = q, k, v
        self.B, self.H, self.N, self.D = q.shape
        self.DV = v.shape[-1]
        self.BH = self.B * self.H
        if self.BH > 65535:
            raise ValueError(f"B * H = {self.BH} exceeds the launch grid limit (65535)")
        self.nctx = nctx
        self.causal = causal
        self.blocks = blocks
        self.scale = 1.0 / math.sqrt(self.D)
        self.block_d = max(16, _pow2(self.D))
        self.block_dv = max(16, _pow2(self.DV))
        self.prec = dot_precision(q.dtype)
        self.device = q.device

    def vec(self) -> Tensor:
        return new_buffer((self.BH, self.N), self.device)

    def row_grid(self):
        return lambda bm, bn: (triton.cdiv(self.N, bm), self.BH)

    def col_grid(self):
        return lambda bm, bn: (triton.cdiv(self.N, bn), self.BH)

    def row_lse(self, rb, c, lr=None, with_v=False):
        """(out or None, lse, f or None)."""
        out = new_buffer((self.B, self.H, self.N, self.DV), self.device, self.v.dtype) if with_v else None
        rl = self.vec()
        f = self.vec() if lr is not None else None
        q, k, v = self.q, self.k, self.v
        o = out if out is not None else rl  # dummy pointer when unused
        so = out.stride() if out is not None else (0, 0, 0, 0)
        fwd_kernel(
            self.row_grid(), self.blocks,
            q, k, v, o, rb, c, lr if lr is not None else rl, rl, f if f is not None else rl, self.nctx,
            *q.stride(), *k.stride(), *v.stride(), *so,
            self.H, self.N, self.D, self.DV, self.scale,
            CAUSAL=self.causal, HAS_V=with_v, HAS_F=lr is not None,
            BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PREC=self.prec,
        )
        return out, rl, f

    def col_lse(self, a, c, lp=None, qbound=True):
        """(lse over queries, g or None)."""
        cl = self.vec()
        g = self.vec() if lp is not None else None
        q, k = self.q, self.k
        col_kernel(
            self.col_grid(), self.blocks,
            q, k, a, c, lp if lp is not None else cl, cl, g if g is not None else cl, self.nctx,
            *q.stride(), *k.stride(),
            self.H, self.N, self.D, self.scale,
            CAUSAL=self.causal, HAS_G=lp is not None, QBOUND=qbound,
            BLOCK_D=self.block_d, PREC=self.prec,
        )
        return cl, g

    def wsum_row(self, w, a, c):
        out = self.vec()
        q, k = self.q, self.k
        wsum_row_kernel(
            self.row_grid(), self.blocks,
            q, k, a, c, w, out, self.nctx,
            *q.stride(), *k.stride(),
            self.H, self.N, self.D, self.scale,
            CAUSAL=self.causal, BLOCK_D=self.block_d, PREC=self.prec,
        )
        return out

    def wsum_col(self, w, a, c, qbound=True):
        out = self.vec()
        q, k = self.q, self.k
        wsum_col_kernel(
            self.col_grid(), self.blocks,
            q, k, a, c, w, out, self.nctx,
            *q.stride(), *k.stride(),
            self.H, self.N, self.D, self.scale,
            CAUSAL=self.causal, QBOUND=qbound, BLOCK_D=self.block_d, PREC=self.prec,
        )
        return out

    def backward(self, do, rl, c, delta, lr=None, marginal=None, compute_dv=True,
                 compute_db=False, compute_dqk=True, sinkhorn=None):
        """Column-parallel backward; returns (dq, dk, dv, db), None for what was not asked.
        ``marginal``: (wm, lmu) for the gradient through the key marginal;
        ``sinkhorn``: (n, f, cl+, -dg, g, rl+, -df) stacked [n, B*H, N] vectors."""
        B, H, N, D, DV = self.B, self.H, self.N, self.D, self.DV
        dev = self.device
        dq = torch.zeros((B, H, N, D), device=dev, dtype=torch.float32) if compute_dqk else None
        dk = new_buffer((B, H, N, D), dev) if compute_dqk else None
        dv = new_buffer((B, H, N, DV), dev) if compute_dv else None
        db = self.vec() if compute_db else None
        dummy = rl
        n_sk, stacks = 0, (dummy,) * 6
        if sinkhorn is not None:
            n_sk, *stacks = sinkhorn
        q, k, v = self.q, self.k, self.v
        bwd_kernel(
            self.col_grid(), self.blocks,
            q, k, v, do,
            # DQ is zeroed by the autotuner between trials: never alias it to a live buffer
            dq if dq is not None else torch.zeros(1, device=dev), dk if dk is not None else dummy,
            dv if dv is not None else dummy, db if db is not None else dummy,
            rl, c, lr if lr is not None else dummy,
            *(marginal if marginal is not None else (dummy, dummy)), delta,
            *stacks, self.nctx,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            H, N, D, DV, self.scale, n_sk,
            CAUSAL=self.causal, HAS_DMU=marginal is not None,
            COMPUTE_DV=compute_dv, COMPUTE_DB=compute_db, COMPUTE_DQK=compute_dqk,
            SINKHORN=sinkhorn is not None,
            BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PREC=self.prec,
        )
        return dq, dk, dv, db


def plus_inf_for_neg_inf(x: Tensor) -> Tensor:
    """A log-normaliser with +inf where it is -inf, so exp(x - lse) vanishes there."""
    return torch.where(x == NEG_INF, float("inf"), x)


# --------------------------------------------------------------------------------------------
# masks and laws (O(N) vectors), shared with sinkhorn.py
# --------------------------------------------------------------------------------------------
def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q, k, v must share [B, H, N] (self-attention) and q, k the head dim; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"the Triton kernels take float32/float16/bfloat16 q, k, v of one dtype, got "
            f"{q.dtype}, {k.dtype}, {v.dtype} (use backend='torch' for float64)"
        )
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if not 1 <= d <= 256:
            raise ValueError(f"head dim of {name} must be in 1..256 (tested 16..128), got {d}")
    if not q.is_cuda and not interpreting():
        raise RuntimeError(
            "bayestrain.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "triton); use backend='torch' on CPU"
        )


def _bhn(t: Tensor, B: int, H: int, N: int, name: str) -> Tensor:
    """[N] / [B, N] / [B, H, N] (or broadcastable) -> [B, H, N] float32 view."""
    if t.dim() == 1:
        t = t[None, None]
    elif t.dim() == 2:
        t = t[:, None]
    elif t.dim() != 3:
        raise ValueError(f"{name} must be [N], [B, N] or [B, H, N], got {tuple(t.shape)}")
    try:
        return t.float().expand(B, H, N)
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {(B, H, N)}") from e


class Layout:
    """Masks and log laws from ``key_padding_mask`` / ``n_context`` / ``causal``.

    ``key_ok``: a key some row may see (not padded, ``j < n_context``); ``row_valid``: a
    non-padded query that sees at least one key; ``weighted``: ``row_valid`` and, in the
    ``set`` layout, a context row (``i < n_context``) -- the support of ``rho``.
    """

    def __init__(self, q: Tensor, key_padding_mask: Tensor | None, n_context, causal: bool):
        B, H, N, _ = q.shape
        dev = q.device
        self.B, self.H, self.N = B, H, N
        idx = torch.arange(N, device=dev)
        if n_context is None:
            nctx = torch.full((B,), N, device=dev, dtype=torch.long)
        else:
            nctx = torch.as_tensor(n_context, device=dev)
            if nctx.dtype.is_floating_point or nctx.dtype == torch.bool:
                raise TypeError(f"n_context must be an integer tensor [B] or an int, got {nctx.dtype}")
            nctx = nctx.long().reshape(-1).expand(B) if nctx.numel() == 1 else nctx.long()
            if nctx.shape != (B,):
                raise ValueError(f"n_context must be [B] = [{B}], got {tuple(nctx.shape)}")
            nctx = nctx.clamp(0, N)
        self.nctx = nctx.to(torch.int32).contiguous()
        ctx = idx[None, :] < nctx[:, None]  # (B, N)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, N):
                raise ValueError(
                    f"key_padding_mask must be Bool[B, N] = {(B, N)} (True = padding), got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            valid = ~key_padding_mask.to(dev)
        else:
            valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        self.key_ok = valid & ctx
        if causal:
            sees = self.key_ok.cumsum(-1) > 0
        else:
            sees = self.key_ok.any(-1, keepdim=True).expand(B, N)
        self.row_valid = valid & sees
        self.weighted = self.row_valid & ctx
        self.ctx = ctx

    def bias(self, mask: Tensor) -> Tensor:
        """[B, N] bool -> [B*H, N] float32, 0 where True, -inf where False."""
        z = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32).masked_fill(~mask, NEG_INF)
        return z[:, None].expand(self.B, self.H, self.N).reshape(self.B * self.H, self.N).contiguous()

    def log_rho(self, log_query_weights: Tensor | None) -> Tensor:
        """[B, H, N] float32 (differentiable in ``log_query_weights``)."""
        B, H, N = self.B, self.H, self.N
        if log_query_weights is None:
            n_q = self.weighted.sum(-1, keepdim=True).clamp_min(1).float()
            lr = torch.where(self.weighted, -torch.log(n_q), NEG_INF)
            return lr[:, None].expand(B, H, N)
        lr = _bhn(log_query_weights.to(self.weighted.device), B, H, N, "log_query_weights")
        return lr.masked_fill(~self.weighted[:, None], NEG_INF)

    def log_pi(self, log_prior: Tensor | None, log_rho: Tensor) -> Tensor:
        """[B, H, N] float32: uniform over (or the given prior restricted to) the keys that a
        query carrying mass can see."""
        B, H, N = self.B, self.H, self.N
        any_w = (log_rho.detach() > NEG_INF).any(-1, keepdim=True)  # (B, H, 1)
        seen = self.key_ok[:, None] & any_w  # (B, H, N)
        if log_prior is None:
            n_k = seen.sum(-1, keepdim=True).clamp_min(1).float()
            return torch.where(seen, -torch.log(n_k), NEG_INF)
        lp = _bhn(log_prior.to(seen.device), B, H, N, "log_prior")
        return lp.masked_fill(~seen, NEG_INF)


# --------------------------------------------------------------------------------------------
# softmax attention with key marginals
# --------------------------------------------------------------------------------------------
class SoftmaxMarginalFunction(torch.autograd.Function):
    """(q, k, v, log_rho [B*H, N], row_bias, key_bias, nctx, causal, blocks) -> (out, mu).

    Forward: flash pass (out, row lse) + column pass (log mu_j = lse_i(f_i + S_ij + c_j),
    f_i = log rho_i - lse_i).  Backward: an optional row pre-pass u_i = sum_j A_ij dmu_j (only
    when mu receives a gradient), then one column-parallel pass for dv, dk and dq (atomics).
    Gradients w.r.t. q, k, v and log_rho."""

    @staticmethod
    def forward(ctx, q, k, v, log_rho, row_bias, key_bias, nctx, causal, blocks):
        geo = Geometry(q, k, v, nctx, causal, blocks)
        out, rl, f = geo.row_lse(row_bias, key_bias, lr=log_rho, with_v=True)
        log_mu, _ = geo.col_lse(f, key_bias, qbound=True)
        mu = log_mu.exp().view(geo.B, geo.H, geo.N)
        ctx.save_for_backward(q, k, v, out, log_rho, rl, f, key_bias, nctx)
        ctx.causal, ctx.blocks = causal, blocks
        ctx.set_materialize_grads(False)
        return out, mu

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dmu):
        q, k, v, out, log_rho, rl, f, key_bias, nctx = ctx.saved_tensors
        geo = Geometry(q, k, v, nctx, ctx.causal, ctx.blocks)
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).reshape(geo.BH, geo.N)
        dlr = marginal = None
        if dmu is not None:
            dmu = dmu.float().reshape(geo.BH, geo.N).contiguous()
            ru = geo.wsum_row(dmu, f, key_bias)  # rho_i sum_j A_ij dmu_j  (f = log rho - lse)
            delta = delta + ru
            dlr = ru
            marginal = (dmu, torch.zeros_like(dmu))
        dq, dk, dv, _ = geo.backward(dout, rl, key_bias, delta.contiguous(), lr=log_rho,
                                     marginal=marginal)
        if dlr is None and ctx.needs_input_grad[3]:
            dlr = torch.zeros_like(log_rho)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlr, None, None, None, None, None


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_query_weights: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    n_context: Tensor | int | None = None,
    causal: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused softmax attention with its key marginal; O(N) memory in forward and backward.

    ``q, k, v: [B, H, N, D]`` (fp32 / fp16 / bf16; one dtype); ``log_query_weights``: log rho,
    ``[N] | [B, N] | [B, H, N]`` (default uniform over the valid queries -- in the ``set``
    layout the valid context queries; targets always get rho = 0); ``key_padding_mask:
    Bool[B, N]`` True at padding (neither key nor query; output rows zero); ``n_context:
    LongTensor[B] | int``: ``set`` layout (keys ``j < n_context`` only; rows ``i >=
    n_context`` are targets); ``causal``: key ``j`` visible from query ``i`` iff ``j <= i``.

    Returns ``out [B, H, N, Dv]`` (dtype of v) and ``mu [B, H, N]`` (float32), both
    differentiable (w.r.t. q, k, v and log_query_weights).
    """
    check_inputs(q, k, v)
    lay = Layout(q, key_padding_mask, n_context, causal)
    B, H, N = lay.B, lay.H, lay.N
    log_rho = lay.log_rho(log_query_weights).reshape(B * H, N).contiguous()
    blocks = pick_blocks(N, block_m, block_n)
    return SoftmaxMarginalFunction.apply(
        q, k, v, log_rho, lay.bias(lay.row_valid), lay.bias(lay.key_ok), lay.nctx, bool(causal), blocks
    )


# --------------------------------------------------------------------------------------------
# float64 reference (bayestrain.attention's PyTorch path)
# --------------------------------------------------------------------------------------------
def reference_layout(q, key_padding_mask, n_context, log_query_weights, causal=False):
    """(attn_mask, log_query_weights) for ``bayestrain.attention`` equivalent to
    ``n_context`` (the ``set`` layout) -- identity when ``n_context`` is None."""
    if n_context is None:
        return None, log_query_weights
    from bayestrain.attention import _context_layout

    return _context_layout(q, n_context, None, log_query_weights, key_padding_mask)


def softmax_attention_ref(
    q, k, v, log_query_weights=None, key_padding_mask=None, n_context=None, causal=False,
    dtype: torch.dtype | None = torch.float64,
):
    """``bayestrain.attention.softmax_attention(..., backend='torch')`` with the same
    arguments as :func:`softmax_attention`, computed in ``dtype`` (float64 by default; None
    keeps the inputs' dtype).  Materialises ``[B, H, N, N]``: small N only."""
    from bayestrain.attention import softmax_attention as _torch_softmax

    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if log_query_weights is not None:
            log_query_weights = log_query_weights.to(dtype)
    attn_mask, lqw = reference_layout(q, key_padding_mask, n_context, log_query_weights, causal)
    return _torch_softmax(
        q, k, v, log_query_weights=lqw, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        causal=causal, backend="torch",
    )
