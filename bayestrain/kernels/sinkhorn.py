"""Fused Sinkhorn (prior-consistent) attention, DESIGN.md sections 2.2 and 7.

Per head, with ``S_ij = q_i . k_j / sqrt(D)`` over the visible pairs, ``rho`` the law of the
queries and ``pi`` the prior over keys (log space; ``-inf`` = no mass):

    f^0_i = log rho_i - lse_j S_ij
    for t = 1..n:  g^t_j = log pi_j - lse_i (f^{t-1}_i + S_ij)      (queries with rho_i > 0)
                   f^t_i = log rho_i - lse_j (S_ij + g^t_j)          (t < n)
    A_ij = exp(S_ij + g^n_j - lse_i),  out_i = sum_j A_ij v_j,  mu_j = sum_i rho_i A_ij

(``n = 0`` is softmax; a key no weighted query sees gets ``g = -inf``.)  Every half-iteration
is one flash-style pass that recomputes ``QK^T`` tiles; the kernels are those of
:mod:`bayestrain.kernels.softmax` with a key bias:

* ``_sinkhorn_row_kernel``  -- row pass, online lse over keys of ``S_ij + g_j`` -> ``f_i``;
* ``_sinkhorn_col_kernel``  -- column pass, online lse over queries of ``f_i + S_ij`` -> ``g_j``
  (and, with ``c = g^n``, the key marginal ``log mu_j`` for the residual);
* ``_sinkhorn_fwd_kernel``  -- the output pass (flash forward with key bias ``g^n``);
* ``_sinkhorn_bwd_row_kernel`` / ``_sinkhorn_bwd_col_kernel`` -- adjoint propagation through
  one half-iteration (weighted row / column sums);
* ``_sinkhorn_bwd_kernel``  -- the final column-parallel pass: ``dS`` = the output term plus
  every half-iteration's term, then ``dk`` and ``dq`` (atomics).

Backward (exact gradient of the unrolled iterations; the forward stores ``f^t``, ``g^t`` and the
log-normalisers, O(n N)).  With ``P^t_ij = exp(f^{t-1}_i + S_ij - cl^t_j)`` (column update) and
``R^t_ij = exp(S_ij + g^t_j - rl^t_i)`` (row update, ``g^0 = 0``):

    output pass:  dZ_ij = A_ij (dP_ij - delta_i),  dg^n_j = sum_i dZ_ij   (pass 1, with dv)
    g^t = log pi - cl^t:   d log pi += dg^t,  df^{t-1}_i = -sum_j dg^t_j P^t_ij,
                           dS += -dg^t_j P^t_ij
    f^t = log rho - rl^t:  d log rho += df^t, dg^t_j = -sum_i df^t_i R^t_ij,
                           dS += -df^t_i R^t_ij
    dS is summed over all terms in one final pass (dq, dk).

FLOPs (counting each N x N x D matmul as one unit; flash forward = 2, forward+backward = 7):
forward ``2n + 3`` (n + 1 row passes, n column passes, PV, the marginal pass), backward
``2n + 6`` (+1 when the residual receives a gradient): pass 1 (QK, dO V^T, P^T dO), ``2n - 1``
adjoint passes (one QK each), final pass (QK, dO V^T, dS q, dS k).  Total ``(4 n + 9) / 7``
times flash attention's (DESIGN.md's ``(8 n + 10) / 7`` backpropagates each half-iteration
separately, three matmuls each); the exponentials are ``6 n + 3`` N x N evaluations (flash:
2), which bound the speed at D = 64 as much as the matmuls do.

The residual ``KL(pi || mu)`` per head is returned and is differentiable (its gradient costs
one extra row pass, skipped when it receives none).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor

from bayestrain.kernels.softmax import (
    NEG_INF,
    Geometry,
    Layout,
    _softmax_marginal_bwd_kernel,
    _softmax_marginal_col_kernel,
    _softmax_marginal_fwd_kernel,
    _softmax_marginal_wsum_col_kernel,
    _softmax_marginal_wsum_row_kernel,
    check_inputs,
    pick_blocks,
    plus_inf_for_neg_inf,
    reference_layout,
)

__all__ = ["sinkhorn_attention", "sinkhorn_attention_ref", "SinkhornAttentionFunction"]

# The Sinkhorn passes are the softmax-marginal passes with a key bias (see module docstring).
_sinkhorn_row_kernel = _softmax_marginal_fwd_kernel  # HAS_V=False, HAS_F=True, c = g^t
_sinkhorn_fwd_kernel = _softmax_marginal_fwd_kernel  # HAS_V=True, c = g^n
_sinkhorn_col_kernel = _softmax_marginal_col_kernel  # HAS_G=True (iterations) / False (log mu)
_sinkhorn_bwd_row_kernel = _softmax_marginal_wsum_row_kernel  # df^{t-1} from dg^t
_sinkhorn_bwd_col_kernel = _softmax_marginal_wsum_col_kernel  # dg^t from df^t
_sinkhorn_bwd_kernel = _softmax_marginal_bwd_kernel  # SINKHORN=True


def _kl_residual(log_pi: Tensor, log_mu: Tensor, log_rho: Tensor) -> Tensor:
    """KL(pi || mu) = sum_j pi_j (log pi_j - log mu_j) per row of [B*H, N], in the
    well-conditioned form sum_j pi_j phi(d_j) + (sum_j pi_j - sum_i rho_i) with d = log pi -
    log mu and phi(d) = d - 1 + exp(-d) >= 0 (sum_j mu_j = sum_i rho_i since rows are exactly
    normalised).  Near convergence the direct sum cancels to ~1e-7 absolute in float32; this
    form keeps the error second order in d."""
    pos = log_pi > NEG_INF
    d = torch.where(pos, log_pi, 0.0) - torch.where(pos, log_mu, 0.0)
    terms = torch.where(pos, log_pi.exp() * (d + torch.expm1(-d)), 0.0)
    mass = log_pi.double().exp().sum(-1) - log_rho.double().exp().sum(-1)
    return (terms.double().sum(-1) + mass).float()


class SinkhornAttentionFunction(torch.autograd.Function):
    """(q, k, v, log_rho [B*H, N], log_pi [B*H, N], row_bias, key_bias, nctx, n_iters, blocks)
    -> (out [B, H, N, Dv], kl [B, H]).  Gradients w.r.t. q, k, v, log_rho and log_pi, through
    both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, log_rho, log_pi, row_bias, key_bias, nctx, n_iters, blocks):
        geo = Geometry(q, k, v, nctx, False, blocks)
        n = n_iters
        fs, rls, gs, cls = [], [], [key_bias], []
        if n > 0:
            _, rl, f = geo.row_lse(row_bias, key_bias, lr=log_rho)  # f^0
            fs.append(f)
            rls.append(rl)
            for t in range(1, n + 1):
                cl, g = geo.col_lse(fs[t - 1], key_bias, lp=log_pi)  # g^t
                cls.append(cl)
                gs.append(g)
                if t < n:
                    _, rl, f = geo.row_lse(row_bias, g, lr=log_rho)  # f^t
                    fs.append(f)
                    rls.append(rl)
        g_n = gs[n]
        out, rl_n, f_n = geo.row_lse(row_bias, g_n, lr=log_rho, with_v=True)
        log_mu, _ = geo.col_lse(f_n, g_n)  # log mu_j = lse_i (f^n_i + S_ij + g^n_j)
        kl = _kl_residual(log_pi, log_mu, log_rho).view(geo.B, geo.H)

        stacks = [torch.stack(x) if x else None for x in (fs, rls, gs[:n], cls)]
        ctx.save_for_backward(q, k, v, out, log_rho, log_pi, key_bias, nctx, rl_n, f_n, g_n, log_mu, *stacks)
        ctx.n_iters, ctx.blocks = n, blocks
        ctx.set_materialize_grads(False)
        return out, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dkl):
        q, k, v, out, log_rho, log_pi, key_bias, nctx, rl_n, f_n, g_n, log_mu, *rest = ctx.saved_tensors
        n = ctx.n_iters
        fs, rls, gs, cls = rest  # [n, B*H, N] each (None when n = 0)
        geo = Geometry(q, k, v, nctx, False, ctx.blocks)
        BH, N = geo.BH, geo.N

        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).reshape(BH, N)
        dlr = torch.zeros_like(log_rho)
        dlp = torch.zeros_like(log_pi)
        marginal = None
        if dkl is not None:
            dkl = dkl.float().reshape(BH, 1)
            pos = log_pi > NEG_INF
            lmu = torch.where(pos, log_mu, 0.0)
            lp = torch.where(pos, log_pi, 0.0)
            # kl = sum_j pi_j (log pi_j - log mu_j): direct term in log pi, and
            # d mu_j = -dkl pi_j / mu_j, applied as rho_i A_ij d mu_j = wm_j exp(log(rho_i A_ij) - log mu_j)
            dlp = dlp + torch.where(pos, dkl * lp.exp() * (lp - lmu + 1.0), 0.0)
            wm = torch.where(pos, -dkl * lp.exp(), 0.0).contiguous()
            lmu_p = plus_inf_for_neg_inf(log_mu).contiguous()
            # ru_i = rho_i sum_j A_ij dmu_j = sum_j wm_j exp(f^n_i + S_ij + g^n_j - log mu_j)
            ru = geo.wsum_row(wm, f_n, (g_n - lmu_p).contiguous())
            delta = delta + ru
            dlr = dlr + ru
            marginal = (wm, lmu_p)
        delta = delta.contiguous()

        if n == 0:  # softmax with a residual
            dq, dk, dv, _ = geo.backward(dout, rl_n, g_n, delta, lr=log_rho, marginal=marginal)
        else:
            # pass 1: dv and dg^n = sum_i dZ_ij
            _, _, dv, dg = geo.backward(dout, rl_n, g_n, delta, lr=log_rho, marginal=marginal,
                                        compute_dv=True, compute_db=True, compute_dqk=False)
            cl_p = plus_inf_for_neg_inf(cls)  # +inf where -inf: the terms vanish
            rl_p = plus_inf_for_neg_inf(rls)
            wg = torch.empty_like(cls)  # -dg^{t+1}, t = 0..n-1
            wf = torch.empty_like(rls)  # -df^t
            wg[n - 1] = -dg
            dlp = dlp + dg
            for t in range(n, 0, -1):
                df = geo.wsum_row(wg[t - 1], fs[t - 1], -cl_p[t - 1])  # df^{t-1}
                wf[t - 1] = -df
                dlr = dlr + df
                if t - 1 >= 1:
                    dg = geo.wsum_col(wf[t - 1], -rl_p[t - 1], gs[t - 1])  # dg^{t-1}
                    wg[t - 2] = -dg
                    dlp = dlp + dg
            dq, dk, _, _ = geo.backward(
                dout, rl_n, g_n, delta, lr=log_rho, marginal=marginal,
                compute_dv=False, compute_db=False, compute_dqk=True,
                sinkhorn=(n, fs.contiguous(), cl_p.contiguous(), wg, gs.contiguous(), rl_p.contiguous(), wf),
            )
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlr, dlp,
                None, None, None, None, None)


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_prior: Tensor | None = None,
    log_query_weights: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    n_context: Tensor | int | None = None,
    n_iters: int = 3,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused Sinkhorn attention (``bidirectional`` or ``set`` layout), O(N) memory.

    ``q, k, v: [B, H, N, D]`` (fp32 / fp16 / bf16; one dtype); ``log_prior``: log pi, ``[N] |
    [B, N] | [B, H, N]`` (default uniform over the keys some weighted query sees; mass on other
    keys is dropped); ``log_query_weights``: log rho (default uniform over the valid queries
    -- in the ``set`` layout the valid context queries; targets always get rho = 0);
    ``key_padding_mask: Bool[B, N]`` True at padding (neither key nor query; output rows
    zero); ``n_context: LongTensor[B] | int``: ``set`` layout -- rows and keys ``j <
    n_context`` are the context (bidirectional among themselves), rows ``i >= n_context`` are
    targets that see the context keys only.  No causal variant (DESIGN.md 2.2).

    Returns ``out [B, H, N, Dv]`` (dtype of v) and ``kl = KL(pi || mu) [B, H]`` (float32), the
    residual of the last iteration; both are differentiable (w.r.t. q, k, v, log_prior and
    log_query_weights); gradients are those of the unrolled iterations.
    """
    check_inputs(q, k, v)
    if not isinstance(n_iters, int) or isinstance(n_iters, bool) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    lay = Layout(q, key_padding_mask, n_context, causal=False)
    B, H, N = lay.B, lay.H, lay.N
    lr = lay.log_rho(log_query_weights)
    lp = lay.log_pi(log_prior, lr)
    blocks = pick_blocks(N, block_m, block_n)
    return SinkhornAttentionFunction.apply(
        q, k, v,
        lr.reshape(B * H, N).contiguous(), lp.reshape(B * H, N).contiguous(),
        lay.bias(lay.row_valid), lay.bias(lay.key_ok), lay.nctx, n_iters, blocks,
    )


def sinkhorn_attention_ref(
    q, k, v, log_prior=None, log_query_weights=None, key_padding_mask=None, n_context=None,
    n_iters=3, dtype: torch.dtype | None = torch.float64,
):
    """``bayestrain.attention.sinkhorn_attention(..., backend='torch', return_residual=True)``
    with the arguments of :func:`sinkhorn_attention`, in ``dtype`` (float64 by default; None
    keeps the inputs' dtype).  Returns ``(out, kl)``; materialises ``[B, H, N, N]``."""
    from bayestrain.attention import sinkhorn_attention as _torch_sinkhorn

    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if log_query_weights is not None:
            log_query_weights = log_query_weights.to(dtype)
        if log_prior is not None:
            log_prior = log_prior.to(dtype)
    attn_mask, lqw = reference_layout(q, key_padding_mask, n_context, log_query_weights)
    return _torch_sinkhorn(
        q, k, v, log_prior=log_prior, log_query_weights=lqw, key_padding_mask=key_padding_mask,
        attn_mask=attn_mask, n_iters=n_iters, backend="torch", return_residual=True,
    )
