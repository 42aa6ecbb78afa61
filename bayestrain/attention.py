"""Constrained attention: Sinkhorn (prior-consistent) attention and softmax attention that
also returns its key marginal.

A head's weights ``A: [B, H, Q, K]`` are a Markov kernel from queries to keys; ``rho: [B, Q]``
is the law of the queries.  Prior consistency asks that the key marginal
``mu_j = sum_i rho_i A_ij`` equals a prior ``pi`` fixed in advance (DESIGN.md section 2.2).
Sinkhorn attention enforces it by alternating row and column normalisations of the joint in
log space (entropic optimal transport between ``rho`` and ``pi``; with a uniform prior this is
the Sinkformer of Sander et al., AISTATS 2022).

Everything here works in log space with masked log-sum-exps whose backward never produces
NaN, even for fully masked rows or columns and scores of magnitude 1e4.

Conventions (PyTorch's own): ``key_padding_mask: Bool[B, N]`` is True at padding (padded
positions are neither keys nor queries and their output rows are zero); ``attn_mask:
Bool[..., Q, K]`` is True where attention is allowed.  Priors and query weights are given in
log space; ``None`` means uniform over the visible keys / the valid queries.

The functions in this file are the PyTorch backend and, run in float64, the reference that
the Triton kernels (``bayestrain.kernels``) are tested against.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "sinkhorn_attention",
    "softmax_attention",
    "masked_logsumexp",
    "attention_masks",
    "sinkhorn_potentials",
]

_NEG_INF = float("-inf")


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """``logsumexp`` of ``x`` over ``dim`` restricted to ``mask``; ``-inf`` where nothing is
    selected.  Its gradient is finite everywhere (zero for fully masked slices): the masked
    entries are replaced by a finite value before the reduction, so ``exp(x - lse)`` is never
    ``exp(-inf + inf)``."""
    mask = mask & ~torch.isneginf(x)  # a -inf entry contributes nothing, and must not in backward
    empty = ~mask.any(dim=dim, keepdim=True)
    x = x.masked_fill(~mask, _NEG_INF).masked_fill(empty, 0.0)
    return torch.logsumexp(x, dim=dim).masked_fill(empty.squeeze(dim), _NEG_INF)


def attention_masks(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    log_query_weights: Tensor | None = None,
    log_prior: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resolve the masks and the log laws of queries and keys.

    Returns ``allowed: Bool[B, *, Q, K]`` (query ``i`` may see key ``j``), ``row_valid:
    Bool[B, *, Q]`` (a non-padded query), ``log_rho: [B, *, Q]`` and ``log_pi: [B, *, K]``
    (``*`` is 1 or H).  Default ``rho`` is uniform over the valid queries; default ``pi`` is
    uniform over the keys that some query with ``rho_i > 0`` can see.  The laws are returned in
    ``dtype`` (the potentials' working precision: float32 or wider).
    """
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(
                f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}; "
                "convert additive masks with `mask == 0`"
            )
        allowed = allowed & attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
    row_valid = torch.ones(batch, 1, q_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len) or q_len != k_len:
            raise ValueError(
                f"key_padding_mask must be Bool[B, N] = {(batch, k_len)} with as many queries "
                f"as keys, got {tuple(key_padding_mask.shape)} for {q_len} queries"
            )
        valid = ~key_padding_mask[:, None]  # (B, 1, N)
        allowed = allowed & valid[..., None, :] & valid[..., :, None]
        row_valid = row_valid & valid
    row_valid = row_valid & allowed.any(-1)  # a query that sees nothing is not a query

    if log_query_weights is None:
        n_q = row_valid.sum(-1, keepdim=True).clamp_min(1)
        log_rho = torch.where(row_valid, -torch.log(n_q.to(dtype)), _NEG_INF)
    else:
        log_rho = _as_bhx(log_query_weights, batch).to(dtype).masked_fill(~row_valid, _NEG_INF)

    # keys that a query carrying mass can see: only those can carry prior mass
    seen = (allowed & (log_rho > _NEG_INF)[..., None]).any(-2)  # (B, *, K)
    if log_prior is None:
        n_k = seen.sum(-1, keepdim=True).clamp_min(1)
        log_pi = torch.where(seen, -torch.log(n_k.to(dtype)), _NEG_INF)
    else:
        log_pi = _as_bhx(log_prior, batch).to(dtype).masked_fill(~seen, _NEG_INF)
    return allowed, row_valid, log_rho, log_pi


def _as_bhx(t: Tensor, batch: int) -> Tensor:
    """[N] / [B, N] / [B, H, N] -> broadcastable [B, *, N]."""
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:
        return t[:, None]
    if t.dim() == 3:
        return t
    raise ValueError(f"expected a [N], [B, N] or [B, H, N] tensor, got shape {tuple(t.shape)}")


def sinkhorn_potentials(
    scores: Tensor, allowed: Tensor, log_rho: Tensor, log_pi: Tensor, n_iters: int
) -> Tensor:
    """Key potentials ``g: [B, H, K]`` after ``n_iters`` log-domain Sinkhorn iterations on
    ``scores: [B, H, Q, K]`` (float32 or wider).  ``n_iters = 0`` gives ``g = 0`` (softmax).

    f_i <- log rho_i - lse_j S_ij;  repeat: g_j <- log pi_j - lse_i (f_i + S_ij) over rho_i > 0,
                                            f_i <- log rho_i - lse_j (S_ij + g_j).
    """
    g = scores.new_zeros(scores.shape[:-2] + scores.shape[-1:])  # (B, H, K)
    if n_iters == 0:
        return g
    f = log_rho - masked_logsumexp(scores, allowed, dim=-1)  # (B, H, Q)
    col_allowed = allowed & (log_rho > _NEG_INF)[..., None]  # only queries carrying mass
    for it in range(n_iters):
        col = masked_logsumexp(f[..., :, None] + scores, col_allowed, dim=-2)  # (B, H, K)
        # a key no weighted query sees gets g = -inf (it is then unreachable for every row)
        g = torch.where(col > _NEG_INF, log_pi - col.masked_fill(col == _NEG_INF, 0.0), _NEG_INF)
        if it + 1 < n_iters:  # the last f is not needed: rows are normalised exactly below
            f = log_rho - masked_logsumexp(scores + g[..., None, :], allowed, dim=-1)
    return g


def _key_marginal_kl(log_attn: Tensor, log_rho: Tensor, log_pi: Tensor, allowed: Tensor):
    """(mu, KL(pi || mu)) from log-weights: mu_j = sum_i rho_i A_ij, per head."""
    weighted = allowed & (log_rho > _NEG_INF)[..., None]
    log_mu = masked_logsumexp(log_rho[..., :, None] + log_attn, weighted, dim=-2)  # (B, H, K)
    pi = log_pi.exp()
    kl = (pi * (log_pi - log_mu).masked_fill(pi == 0, 0.0)).sum(-1)  # (B, H)
    return log_mu.exp(), kl


def _row_normalised_log_weights(scores: Tensor, allowed: Tensor, row_valid: Tensor) -> Tensor:
    log_a = scores - masked_logsumexp(scores, allowed, dim=-1)[..., None]
    return log_a.masked_fill(~allowed | ~row_valid[..., None], _NEG_INF)


def _torch_attention(
    q, k, v, g_fn, key_padding_mask, attn_mask, log_query_weights, log_prior, return_weights
):
    B, H, Q, D = q.shape
    K = k.shape[-2]
    # potentials in float32 or wider whatever the input precision
    work = torch.promote_types(q.dtype, torch.float32)
    allowed, row_valid, log_rho, log_pi = attention_masks(
        B, Q, K, q.device, key_padding_mask, attn_mask, log_query_weights, log_prior, dtype=work
    )
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) / math.sqrt(D)  # (B, H, Q, K)
    g = g_fn(scores, allowed, log_rho, log_pi)
    log_a = _row_normalised_log_weights(scores + g[..., None, :], allowed, row_valid)
    attn = log_a.exp()  # padded / empty rows are exactly zero
    out = (attn @ v.to(work)).to(v.dtype)  # (B, H, Q, Dv)
    mu, kl = _key_marginal_kl(log_a, log_rho.expand(B, H, Q), log_pi.expand(B, H, K), allowed)
    return out, attn if return_weights else None, mu, kl


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _pick_backend(backend: str, q: Tensor, attn_mask: Tensor | None, return_weights: bool) -> str:
    """The fused kernels take the ``set`` layout as ``n_context`` and never build weights: a
    general ``attn_mask``, returned weights or float64 go to the PyTorch path."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    fusable = attn_mask is None and not return_weights and q.dtype != torch.float64
    if backend == "auto":
        return "triton" if fusable and q.is_cuda and _triton_available() else "torch"
    if backend == "triton" and not fusable:
        raise ValueError(
            "backend='triton' takes no attn_mask (use n_context for the set layout), returns no weights "
            "and runs in fp32/bf16/fp16; use backend='torch' for the rest"
        )
    return backend


def _context_layout(q: Tensor, n_context, attn_mask, log_query_weights, key_padding_mask=None):
    """``n_context`` (the set layout: rows/keys ``< n_context[b]`` are the context, later rows
    are targets that see the context only and carry no query weight) as a PyTorch mask and
    query weights, for the PyTorch path."""
    B, _, N, _ = q.shape
    n = torch.as_tensor(n_context, device=q.device).reshape(-1).expand(B)
    ctx = torch.arange(N, device=q.device)[None, :] < n[:, None]  # (B, N)
    mask = ctx[:, None, None, :]
    attn_mask = mask if attn_mask is None else attn_mask & mask
    if log_query_weights is None:
        weighted = ctx if key_padding_mask is None else ctx & ~key_padding_mask
        n_q = weighted.sum(-1, keepdim=True).clamp_min(1).to(torch.promote_types(q.dtype, torch.float32))
        log_query_weights = torch.where(weighted, -torch.log(n_q), _NEG_INF)
    else:
        w = log_query_weights
        log_query_weights = torch.where(ctx if w.dim() <= 2 else ctx[:, None], w, _NEG_INF)
    return attn_mask, log_query_weights


def _triton_available() -> bool:
    try:
        from bayestrain import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_prior: Tensor | None = None,
    log_query_weights: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    n_iters: int = 3,
    backend: str = "auto",
    return_residual: bool = False,
    return_weights: bool = False,
    n_context: Tensor | int | None = None,
):
    """Prior-consistent attention: the key marginal of ``rho (x) A`` is driven to ``pi``.

    ``q, k, v: [B, H, N, D]``; ``log_prior: [K] | [B, K] | [B, H, K]`` (log pi, default uniform
    over visible keys); ``log_query_weights: [Q] | [B, Q]`` (log rho, default uniform over valid
    queries).  Rows are exactly normalised; the key marginal converges to ``pi`` linearly in
    ``n_iters`` (``n_iters = 0`` is softmax).  Gradients are those of the unrolled iterations.

    ``n_context: LongTensor[B] | int`` gives the ``set`` layout without a mask: rows and keys
    before ``n_context[b]`` are the context, later rows are targets that see the context only
    and carry no query weight (the form the fused Triton kernel takes).

    Returns ``out: [B, H, Q, D]``, then ``residual = KL(pi || mu): [B, H]`` if
    ``return_residual``, then the weights ``[B, H, Q, K]`` if ``return_weights`` (torch only).
    There is no ``causal`` argument: under a causal mask the column update sums over later
    queries, so outputs would see future tokens (DESIGN.md section 2.2).
    """
    _check_qkv(q, k, v)
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    if _pick_backend(backend, q, attn_mask, return_weights) == "triton":
        from bayestrain.kernels import sinkhorn_attention as _triton_sinkhorn

        out, kl = _triton_sinkhorn(
            q, k, v, log_prior=log_prior, log_query_weights=log_query_weights,
            key_padding_mask=key_padding_mask, n_context=n_context, n_iters=n_iters,
        )
        return (out, kl) if return_residual else out
    if n_context is not None:
        attn_mask, log_query_weights = _context_layout(q, n_context, attn_mask, log_query_weights, key_padding_mask)

    def g_fn(scores, allowed, log_rho, log_pi):
        return sinkhorn_potentials(scores, allowed, log_rho, log_pi, n_iters)

    out, attn, _, kl = _torch_attention(
        q, k, v, g_fn, key_padding_mask, attn_mask, log_query_weights, log_prior, return_weights
    )
    result = (out,)
    if return_residual:
        result += (kl,)
    if return_weights:
        result += (attn,)
    return result[0] if len(result) == 1 else result


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_query_weights: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    backend: str = "auto",
    return_weights: bool = False,
    n_context: Tensor | int | None = None,
):
    """Softmax attention that also returns the key marginal ``mu_j = sum_i rho_i A_ij``.

    Returns ``(out [B, H, Q, D], mu [B, H, K])`` and, with ``return_weights``, the weights
    ``[B, H, Q, K]``.  Gradients flow through both ``out`` and ``mu``, so the prior-consistency
    penalty can be trained from the marginals alone.
    """
    _check_qkv(q, k, v)
    if _pick_backend(backend, q, attn_mask, return_weights) == "triton":
        from bayestrain.kernels import softmax_attention as _triton_softmax

        return _triton_softmax(q, k, v, log_query_weights=log_query_weights,
                               key_padding_mask=key_padding_mask, n_context=n_context, causal=causal)
    if causal:
        Q, K = q.shape[-2], k.shape[-2]
        tri = torch.ones(Q, K, dtype=torch.bool, device=q.device).tril(K - Q)
        attn_mask = tri if attn_mask is None else attn_mask & tri
    if n_context is not None:
        attn_mask, log_query_weights = _context_layout(q, n_context, attn_mask, log_query_weights, key_padding_mask)

    def g_fn(scores, allowed, log_rho, log_pi):
        return scores.new_zeros(scores.shape[:-2] + scores.shape[-1:])

    out, attn, mu, _ = _torch_attention(
        q, k, v, g_fn, key_padding_mask, attn_mask, log_query_weights, None, return_weights
    )
    return (out, mu, attn) if return_weights else (out, mu)
