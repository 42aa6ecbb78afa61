"""Block-level conditions: each attention head is a Bayes update (DESIGN.md section 2.2).

Read a head as an update kernel ``A: [B, H, Q, K]`` (rows: queries, a distribution over their
visible keys) with query law ``rho: [B, Q]``.

- ``prior_consistency``: with a prior ``pi`` over keys fixed in advance, ``A`` is the Bayes
  posterior of ``pi`` under some likelihood exactly when the key marginal ``mu_j = sum_i rho_i
  A_ij`` equals ``pi_j``.  Value and penalty ``KL(pi || mu)`` (nats), total variation logged.
  Works from the weights or from the key marginals alone.  Enforced by construction by
  Sinkhorn attention (``bayestrain.attention.sinkhorn_attention``; the Sinkformer of Sander
  et al., AISTATS 2022, for the uniform prior): the ``projection`` mode logs its residual.
- ``reversibility`` (self-Bayes, detailed balance): for a square block (the context of a
  ``set`` / ``bidirectional`` model) with stationary law ``pi A = pi``, ``pi_i A_ij = pi_j
  A_ji``.  Value ``(1/2) sum_ij |pi_i A_ij - pi_j A_ji|`` in ``[0, 1]``, ``pi`` solved exactly
  by one linear solve.  A symmetric score (tied ``W_Q = W_K``, biases alike, with or without
  RoPE) gives it exactly; the ``projection`` mode ties them after each optimizer step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayestrain.conditions.base import Condition, ConditionInput, ViolationState

PRIOR_NAMES = ("uniform", "causal_uniform")

#: Uniform teleportation mixed into the kernel *for the stationary solve only*:
#: ``pi`` solves ``pi ((1 - d) A + d U) = pi``.  It makes the linear system nonsingular for
#: reducible kernels (exact zeros from masking or underflow: no NaN, no inf) and moves ``pi``
#: by ``O(d * condition)`` otherwise, i.e. ~1e-12 for a well-mixing kernel in float64.
STATIONARY_TELEPORT = 1e-12

_PRIOR_SUM_TOL = 1e-6  # a tensor prior must sum to 1 over the visible keys within this
_RHO_SUM_TOL = 1e-5  # query weights likewise (float32 traces: n * exp(fl(-log n)) != 1 exactly)


# ----------------------------------------------------------------------------- helpers
def _as_list(x, what: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Sequence) and len(x) and all(isinstance(t, Tensor) for t in x):
        return list(x)
    raise ValueError(f"{what} must be a tensor or a non-empty list of per-layer tensors, got {type(x).__name__}")


def _work(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider whatever the model's precision (DESIGN.md section 5)."""
    return torch.promote_types(dtype, torch.float32)


def _plain(x):
    """Hydra/OmegaConf lists -> plain nested lists (torch.as_tensor wants real sequences)."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return x
    return [_plain(v) for v in x]


def _key_mask(key_mask: Tensor | None, B: int, K: int, device) -> Tensor:
    if key_mask is None:
        return torch.ones(B, K, dtype=torch.bool, device=device)
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, K):
        raise ValueError(
            f"key_mask must be Bool[B, K] = {(B, K)} (True = a visible key), got "
            f"{key_mask.dtype} {tuple(key_mask.shape)}"
        )
    return key_mask.to(device)


def causal_uniform_prior(key_mask: Tensor) -> Tensor:
    """``pi_j = (1/N) sum_{i >= r_j} 1/(i+1)`` over the ``N`` visible keys of each row of
    ``key_mask: Bool[B, K]`` (``r_j`` the rank of key ``j`` among them): the key marginal of
    uniform causal attention under uniform query weights.  ``[B, K]`` float64, zero off the
    mask."""
    K = key_mask.shape[-1]
    m = key_mask.to(torch.float64)
    n = m.sum(-1, keepdim=True)  # (B, 1)
    rank = (m.cumsum(-1) - 1).clamp_min(0).long()  # (B, K)
    inv = 1.0 / torch.arange(1, K + 1, dtype=torch.float64, device=key_mask.device)
    harmonic = torch.cat([inv.new_zeros(1), inv.cumsum(0)])  # H_0 .. H_K
    # sum_{i=r}^{N-1} 1/(i+1) = H_N - H_r
    pi = (harmonic[n.long()] - harmonic[rank]) / n.clamp_min(1)
    return pi * m


def _resolve_prior(prior, key_mask: Tensor, like: Tensor, validate: bool = True) -> Tensor:
    """The prior as probabilities ``[B or 1, H or 1, K]`` in ``like``'s dtype (``like``: the
    key marginal ``[B, H, K]``).  Named priors are built on the visible keys; tensor priors are
    validated (one host sync: it is a validation)."""
    B, H, K = like.shape
    if isinstance(prior, str):
        if prior == "uniform":
            m = key_mask.to(torch.float64)
            pi = m / m.sum(-1, keepdim=True).clamp_min(1)
        elif prior == "causal_uniform":
            pi = causal_uniform_prior(key_mask)
        else:
            raise ValueError(
                f"prior={prior!r} is not one of {list(PRIOR_NAMES)} or a probability tensor "
                "[K], [B, K] or [B, H, K]"
            )
        return pi[:, None].to(like.dtype)

    pi = prior if isinstance(prior, Tensor) else torch.as_tensor(_plain(prior), dtype=torch.float64)
    if not pi.is_floating_point():
        pi = pi.to(torch.float64)
    pi = pi.to(device=like.device)
    shapes = {1: (K,), 2: (B, K), 3: (B, H, K)}
    if pi.dim() not in shapes or tuple(pi.shape) != shapes[pi.dim()]:
        raise ValueError(
            f"prior must be [K] = {(K,)}, [B, K] = {(B, K)} or [B, H, K] = {(B, H, K)} "
            f"probabilities (or a name in {list(PRIOR_NAMES)}), got shape {tuple(pi.shape)}"
        )
    pi = pi[None, None] if pi.dim() == 1 else pi[:, None] if pi.dim() == 2 else pi
    if not validate:
        return pi.to(like.dtype)

    p = pi.detach().to(torch.float64)
    visible = key_mask[:, None, :]  # (B, 1, K)
    bad = ~torch.isfinite(p) | (p < 0)
    p = p.masked_fill(bad, 0.0)
    outside = (p * ~visible).amax()
    off = ((p * visible).sum(-1) - 1.0).abs().amax()
    n_bad, outside, off = torch.stack([bad.any().double(), outside, off]).tolist()
    if n_bad:
        raise ValueError("prior must hold probabilities (finite, >= 0); it has negative or non-finite entries")
    if outside > 0:
        raise ValueError(
            f"prior puts mass (up to {outside:.3g}) on keys outside key_mask, i.e. keys that no "
            "weighted query can see: a kernel cannot have mass there, so the condition is refused; "
            "zero those entries and renormalise over the visible keys"
        )
    if off > _PRIOR_SUM_TOL:
        raise ValueError(
            f"prior must sum to 1 over the visible keys (key_mask), but its sums are off by up to "
            f"{off:.3g} (tolerance {_PRIOR_SUM_TOL:g}); pass probabilities (the attention takes "
            "log_prior, the violation functions take probabilities)"
        )
    return pi.to(like.dtype)


def _normalise(w: Tensor) -> Tensor:
    return w / w.sum(-1, keepdim=True)


def _key_marginal(attn: Tensor, query_weights: Tensor | None) -> Tensor:
    """``mu_j = sum_i rho_i A_ij``: ``[B, H, K]`` in float32 or wider."""
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, H, Q, K] weights (or a list of them), got shape {tuple(attn.shape)}")
    B, H, Q, K = attn.shape
    a = attn.to(_work(attn.dtype))
    if query_weights is None:
        # uniform over the rows that carry mass (rows of a kernel sum to 1; padded rows to 0)
        has_mass = a.detach().sum(-1).mean(1) > 0.5  # (B, Q)
        rho = has_mass.to(a.dtype)
        rho = rho / rho.sum(-1, keepdim=True).clamp_min(1)
    else:
        rho = query_weights.to(device=a.device, dtype=a.dtype)
        if rho.dim() == 1:
            rho = rho.expand(B, Q)
        if tuple(rho.shape) != (B, Q):
            raise ValueError(
                f"query_weights must be [B, Q] = {(B, Q)} probabilities (rho), got {tuple(query_weights.shape)}"
            )
    return torch.einsum("bq,bhqk->bhk", rho, a)


def _check_query_weights(query_weights: Tensor) -> None:
    r = query_weights.detach().to(torch.float64)
    neg, off = torch.stack([(~torch.isfinite(r) | (r < 0)).any().double(),
                            (r.nan_to_num(0.0).sum(-1) - 1).abs().amax()]).tolist()
    if neg or off > _RHO_SUM_TOL:
        raise ValueError(
            f"query_weights must be probabilities over the queries (>= 0, rows summing to 1), "
            f"got {'negative or non-finite entries' if neg else f'row sums off by {off:.3g}'}"
        )


def _kl_tv(pi: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(pi || mu)`` and ``TV(pi, mu)`` over the last axis.  ``0 log 0 = 0``; ``log mu`` is
    floored at the smallest normal number, so gradients stay finite where ``mu`` underflows
    (zero where ``pi = 0``; a key with ``pi > 0`` and ``mu = 0`` gives a large finite value)."""
    tiny = torch.finfo(mu.dtype).tiny
    pos = pi > 0
    log_ratio = torch.where(pos, pi.clamp_min(tiny).log() - mu.clamp_min(tiny).log(), 0.0)
    kl = (pi * log_ratio).sum(-1)
    tv = 0.5 * (pi - mu).abs().sum(-1)
    return kl, tv


# ----------------------------------------------------------------------------- prior consistency
def prior_consistency_violation(
    attn=None,
    *,
    key_marginals=None,
    prior="uniform",
    query_weights: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> ViolationState:
    """Prior consistency of attention kernels: ``KL(pi || mu)`` with ``mu_j = sum_i rho_i A_ij``.

    Pass exactly one of ``attn`` (``[B, H, Q, K]`` weights, or a list of per-layer ones) or
    ``key_marginals`` (``[B, H, K]``, or a list).  ``query_weights: [B, Q]`` probabilities
    ``rho`` (default: uniform over the rows of ``attn`` that carry mass); ``key_mask: Bool[B,
    K]`` the visible keys (default: all).  ``prior``: probabilities ``[K]``, ``[B, K]`` or
    ``[B, H, K]``, or ``"uniform"`` (over the visible keys) or ``"causal_uniform"``
    (``pi_j = (1/N) sum_{i >= j} 1/(i+1)`` over the ``N`` visible keys, the key marginal of
    uniform causal attention).  A tensor prior with mass outside ``key_mask``, or that does not
    sum to 1 over it, is refused (ValueError).

    Value: ``KL(pi || mu)`` in nats, averaged over heads, layers and batch; extras ``tv``:
    ``0.5 sum_j |pi_j - mu_j|`` averaged alike.
    """
    return _prior_consistency(attn, key_marginals, prior, query_weights, key_mask, validate=True)


def _prior_consistency(attn, key_marginals, prior, query_weights, key_mask, validate: bool) -> ViolationState:
    """``validate=False``: the condition objects' per-step path, whose query weights come from the
    model's trace and whose priors are built or checked at construction (no host sync)."""
    if (attn is None) == (key_marginals is None):
        raise ValueError("prior_consistency_violation: pass exactly one of attn ([B, H, Q, K] weights) "
                         "or key_marginals= ([B, H, K])")
    if key_marginals is not None:
        if query_weights is not None:
            raise ValueError("query_weights apply to attn weights; key_marginals already include rho")
        mus = _as_list(key_marginals, "key_marginals")
        for m in mus:
            if m.dim() != 3:
                raise ValueError(f"key_marginals must be [B, H, K] (or a list), got shape {tuple(m.shape)}")
        mus = [m.to(_work(m.dtype)) for m in mus]
    else:
        if query_weights is not None and validate:
            _check_query_weights(query_weights)
        mus = [_key_marginal(a, query_weights) for a in _as_list(attn, "attn")]
    if any(m.shape != mus[0].shape for m in mus):
        raise ValueError(f"per-layer attention shapes differ: {[tuple(m.shape) for m in mus]}")
    B, H, K = mus[0].shape
    km = _key_mask(key_mask, B, K, mus[0].device)
    pi = _resolve_prior(prior, km, mus[0], validate)
    kls, tvs = zip(*(_kl_tv(pi, mu) for mu in mus))
    kl = torch.stack(kls).mean()
    tv = torch.stack(tvs).mean()
    return ViolationState(violation=kl, value=kl.detach(), extras={"tv": tv.detach()})


# ----------------------------------------------------------------------------- reversibility
def _restrict(attn: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel restricted to the visible block, rows renormalised there (a no-op for a
    block that only sees itself, e.g. a ``set`` context): ``(A_block [B, H, N, N], vis [B, 1, N])``
    in float64."""
    a = attn.to(torch.float64)
    vis = key_mask[:, None, :].to(torch.float64)  # (B, 1, N)
    a = a * (vis[..., :, None] * vis[..., None, :])
    rs = a.sum(-1, keepdim=True)
    return a / torch.where(rs > 0, rs, torch.ones_like(rs)), vis


def _stationary(a: Tensor, vis: Tensor) -> Tensor:
    """Solve ``pi (I - A_d + u u^T) = u^T`` (``u`` the visible indicator, ``A_d`` the kernel
    with a ``STATIONARY_TELEPORT`` of uniform teleportation): the invisible block of the matrix
    is the identity (``pi = 0`` there) and on the visible block it is the classical
    ``pi = 1^T (I - A + 1 1^T)^{-1}``, the unique solution of ``pi A = pi, sum pi = 1``."""
    B, H, N, _ = a.shape
    n = vis.sum(-1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    uu = vis[..., :, None] * vis[..., None, :]  # (B, 1, N, N)
    d = STATIONARY_TELEPORT
    a_d = (1 - d) * a + d * uu / n[..., None]
    eye = torch.eye(N, dtype=a.dtype, device=a.device)
    m = eye - a_d + uu
    rhs = vis.expand(B, H, N)[..., None]
    # solve_ex: no error check, hence no host sync on CUDA (the teleportation keeps m nonsingular)
    pi, _ = torch.linalg.solve_ex(m.transpose(-1, -2), rhs)
    return pi.squeeze(-1)  # (B, H, N)


def stationary_law(attn: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Stationary law ``pi: [B, H, N]`` (float64) of square kernels ``[B, H, N, N]`` restricted
    to the visible block ``key_mask: Bool[B, N]`` (zero off it), by one exact linear solve."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"need square kernels [B, H, N, N], got shape {tuple(attn.shape)}")
    km = _key_mask(key_mask, attn.shape[0], attn.shape[-1], attn.device)
    return _stationary(*_restrict(attn, km))


def reversibility_violation(attn, key_mask: Tensor | None = None) -> ViolationState:
    """Detailed balance of square attention blocks ``[B, H, N, N]`` (or a list of per-layer
    ones) restricted to the visible keys ``key_mask: Bool[B, N]`` (default all): with ``pi``
    the exact stationary law of each block (``pi A = pi``, float64 linear solve), value
    ``(1/2) sum_ij |pi_i A_ij - pi_j A_ji|`` in ``[0, 1]``, averaged over heads, layers and
    batch.  Differentiable through the solve (subgradient 0 where a flow is balanced)."""
    mats = _as_list(attn, "attn")
    vals = []
    for a in mats:
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(
                f"reversibility needs square blocks [B, H, N, N] (queries = keys), got shape "
                f"{tuple(a.shape)}"
            )
        km = _key_mask(key_mask, a.shape[0], a.shape[-1], a.device)
        block, vis = _restrict(a, km)
        pi = _stationary(block, vis)
        flow = pi[..., :, None] * block  # (B, H, N, N): pi_i A_ij
        vals.append(0.5 * (flow - flow.transpose(-1, -2)).abs().sum((-1, -2)))  # (B, H)
    v = torch.stack(vals).mean().to(_work(mats[0].dtype))
    return ViolationState(violation=v, value=v.detach())


# ----------------------------------------------------------------------------- tied projection
@torch.no_grad()
def tie_qk_(q_weight: Tensor, k_weight: Tensor, q_bias: Tensor | None = None,
            k_bias: Tensor | None = None) -> None:
    """Euclidean projection onto ``{W_Q = W_K, b_Q = b_K}``, in place: both become their mean.
    The tensors (Parameters, or views/slices of one) keep their identity, so optimizer state
    and DDP buckets are unaffected.  Per head alike, as long as Q and K split heads the same
    way."""
    if q_weight.shape != k_weight.shape:
        raise ValueError(
            f"cannot tie W_Q {tuple(q_weight.shape)} and W_K {tuple(k_weight.shape)}: shapes differ "
            "(grouped-query attention has fewer key heads than query heads)"
        )
    if (q_bias is None) != (k_bias is None):
        raise ValueError("cannot tie a biased projection with an unbiased one: both or neither need a bias")
    pairs = [(q_weight, k_weight)] + ([(q_bias, k_bias)] if q_bias is not None else [])
    for q, k in pairs:
        if q is k:
            continue
        if q.shape != k.shape:
            raise ValueError(f"cannot tie biases of shapes {tuple(q.shape)} and {tuple(k.shape)}")
        mean = (q + k) / 2  # a new tensor: safe for overlapping views of one parameter
        q.copy_(mean)
        k.copy_(mean)


@torch.no_grad()
def tie_fused_qkv_(weight: Tensor, bias: Tensor | None, n_embd: int, layout: str = "rows") -> None:
    """:func:`tie_qk_` for a fused qkv projection whose outputs are ``[q; k; v]``, each
    ``n_embd`` wide, as slices of one parameter.  ``layout="rows"``: an ``nn.Linear`` weight
    ``[3 n_embd, in]``; ``"columns"``: a Hugging Face ``Conv1D`` weight ``[in, 3 n_embd]``
    (GPT-2's ``c_attn``).  The bias is ``[3 n_embd]`` either way.  ``v`` is untouched."""
    if layout not in ("rows", "columns"):
        raise ValueError(f"layout must be 'rows' (nn.Linear) or 'columns' (HF Conv1D), got {layout!r}")
    dim = 0 if layout == "rows" else 1
    if weight.dim() != 2 or weight.shape[dim] != 3 * n_embd:
        raise ValueError(
            f"fused qkv weight with layout={layout!r} must have 3 * n_embd = {3 * n_embd} along dim "
            f"{dim}, got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (3 * n_embd,):
        raise ValueError(f"fused qkv bias must be [3 * n_embd] = [{3 * n_embd}], got {tuple(bias.shape)}")
    q, k = weight.narrow(dim, 0, n_embd), weight.narrow(dim, n_embd, n_embd)
    qb = kb = None
    if bias is not None:
        qb, kb = bias[:n_embd], bias[n_embd : 2 * n_embd]
    tie_qk_(q, k, qb, kb)


def _qk_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules with separate ``q_proj`` / ``k_proj`` linear layers (BayesTransformer's
    ``SelfAttention``; also many Hugging Face attentions)."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "k_proj", None), nn.Linear)
    ]


# ----------------------------------------------------------------------------- condition objects
def _attention_trace(inp: ConditionInput, kind: str, name: str):
    """The trace of the main pass when it has what is needed, else one pass of our own."""
    trace = inp.attn
    if trace is not None and (kind == "marginals" or getattr(trace, "kind", None) == "weights"):
        return trace
    try:
        out = inp.model(inp.x, return_attn=kind)
    except TypeError as e:
        raise ValueError(
            f"condition '{name}' needs a model with attention read-outs "
            f"(model(x, return_attn={kind!r}), e.g. BayesTransformer); {type(inp.model).__name__} has none"
        ) from e
    return out[1]


class PriorConsistency(Condition):
    """``KL(pi || mu)`` of every head's key marginal against a fixed prior (DESIGN.md 2.2).

    ``prior``:

    - ``"uniform"``: uniform over each pass's visible keys (``set`` / ``bidirectional`` models);
    - ``"causal_uniform"``: required for causal models (the key marginal of uniform causal
      attention);
    - weights over key *positions* ``[P]`` (``P >= max_len``; a list from a config is fine) for
      ``set`` / ``bidirectional`` models: in each pass they are conditioned on the visible keys
      (``pi_j = w_j / sum_{visible} w``), exactly as ``BayesTransformer(prior=...)`` conditions
      its Sinkhorn prior on the context length, never on the tokens.

    ``mode="projection"`` needs ``model.attention=sinkhorn`` (the projection is in the forward
    pass) and the model's own prior; it logs the Sinkhorn residual and trains nothing.
    """

    name = "prior_consistency"
    needs_attn = "marginals"
    projection_supported = True

    def __init__(self, prior="uniform", mode: str = "penalty", weight: float = 1.0,
                 warmup_steps: int = 0, eps: float = 0.0, dual_lr: float = 0.1):
        super().__init__(mode=mode, weight=weight, warmup_steps=warmup_steps, eps=eps, dual_lr=dual_lr)
        if isinstance(prior, str):
            if prior not in PRIOR_NAMES:
                raise ValueError(
                    f"{self.name}: prior={prior!r} is not one of {list(PRIOR_NAMES)} or a list of "
                    "weights over key positions"
                )
        else:
            prior = torch.as_tensor(_plain(prior) if not isinstance(prior, Tensor) else prior)
            prior = prior.to(torch.float64) if not prior.is_floating_point() else prior
            p = prior.detach()
            if prior.dim() != 1 or not torch.isfinite(p).all() or (p < 0).any() or not (p > 0).any():
                raise ValueError(
                    f"{self.name}: a fixed prior must be non-negative weights over key positions "
                    f"(one per position up to max_len), got shape {tuple(prior.shape)}"
                )
        self.prior = prior

    def _prior_name(self) -> str:
        return self.prior if isinstance(self.prior, str) else "<weights>"

    def check(self, model, task) -> None:
        if model is None:
            return
        layout = getattr(model, "layout", None)
        attention = getattr(model, "attention", None)
        named = isinstance(self.prior, str)
        if layout == "causal" and not (named and self.prior == "causal_uniform"):
            raise ValueError(
                f"{self.name}: a causal model needs prior=causal_uniform (got prior={self._prior_name()}): "
                "under a causal mask the key marginal has tail sums sum_{j>=k} mu_j <= (N-k)/N, so "
                "a uniform prior is met only by the identity kernel (every token attends to itself "
                "alone); causal_uniform is the key marginal of uniform causal attention"
            )
        max_len = getattr(model, "max_len", None)
        if not named and max_len is not None and self.prior.shape[0] < max_len:
            raise ValueError(
                f"{self.name}: the prior has weights for {self.prior.shape[0]} key positions but the "
                f"model sees up to max_len={max_len}; give one weight per position"
            )
        if self.mode == "projection":
            if attention != "sinkhorn":
                raise ValueError(
                    f"{self.name}: mode=projection enforces the condition in the forward pass and "
                    f"needs model.attention=sinkhorn (got model.attention={attention}); or use mode "
                    "penalty/lagrangian/measure"
                )
            model_log_prior = getattr(model, "log_prior", None)
            if model_log_prior is None:
                if not (named and self.prior == "uniform"):
                    raise ValueError(
                        f"{self.name}: mode=projection logs the residual of the model's own Sinkhorn "
                        f"prior (model.prior=uniform); prior={self._prior_name()} is not what the "
                        "forward pass projects onto: set prior=uniform, or give the model the same "
                        "prior, or use mode=penalty"
                    )
            else:
                w = model_log_prior.detach().double().exp().cpu()
                same = (not named and self.prior.shape[0] >= w.shape[0]
                        and torch.allclose(_normalise(self.prior.detach().double().cpu()[: w.shape[0]]),
                                           _normalise(w), rtol=1e-5, atol=0))
                if not same:
                    raise ValueError(
                        f"{self.name}: mode=projection logs the residual of the model's own Sinkhorn "
                        f"prior (a fixed model.prior), but the condition has prior={self._prior_name()} "
                        "that differs from it; set the condition's prior to the model's weights "
                        "(e.g. ${model.prior}), or use mode=penalty"
                    )

    def _pass_prior(self, trace, K: int):
        """The prior for one pass: a name, or position weights conditioned on the visible keys."""
        if isinstance(self.prior, str):
            return self.prior
        if self.prior.shape[0] < K:
            raise ValueError(
                f"{self.name}: the prior has weights for {self.prior.shape[0]} key positions, this "
                f"pass has {K} keys; give one weight per position up to max_len"
            )
        key_mask = getattr(trace, "key_mask", None)
        w = self.prior[:K].to(device=trace[0].device, dtype=torch.float64)
        w = w[None] if key_mask is None else w * key_mask.to(w.dtype)
        total = w.sum(-1, keepdim=True)
        return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 0.0)

    def _measure(self, trace) -> ViolationState:
        key_mask = getattr(trace, "key_mask", None)
        prior = self._pass_prior(trace, trace[0].shape[-1])
        if isinstance(prior, Tensor) and prior.shape[0] == 1:
            prior = prior[0]
        if getattr(trace, "kind", "weights") == "weights":
            log_rho = getattr(trace, "log_rho", None)
            rho = None if log_rho is None else log_rho.exp()
            return _prior_consistency(list(trace), None, prior, rho, key_mask, validate=False)
        return _prior_consistency(None, list(trace), prior, None, key_mask, validate=False)

    def violation(self, inp: ConditionInput, training: bool) -> ViolationState:
        trace = _attention_trace(inp, "marginals", self.name)
        state = self._measure(trace)
        if self.mode != "projection":
            return state
        residuals = list(getattr(trace, "residuals", []))
        if not residuals:
            raise ValueError(f"{self.name}: mode=projection needs model.attention=sinkhorn (no Sinkhorn residuals in the trace)")
        res = torch.stack(residuals).mean()  # per layer (B, H): mean over layers, batch, heads
        return ViolationState(violation=res, value=res.detach(), extras={"tv": state.extras["tv"]})

    def project_(self, model) -> None:
        """Nothing to do: Sinkhorn attention projects in the forward pass."""


class Reversibility(Condition):
    """Detailed balance of each head's context block (DESIGN.md 2.2), for ``set`` and
    ``bidirectional`` models.  ``mode="projection"``: ``W_Q, W_K <- (W_Q + W_K) / 2`` (biases
    alike) after each optimizer step, in place, the same Parameter objects."""

    name = "reversibility"
    needs_attn = "weights"
    projection_supported = True

    def check(self, model, task) -> None:
        if model is None:
            return
        if getattr(model, "layout", None) == "causal":
            raise ValueError(
                f"{self.name}: refused for a causal model (layout=causal): the stationary law of a "
                "causal kernel is a point mass on the first key, so detailed balance would hold "
                "vacuously; use model.layout=set or model.layout=bidirectional"
            )
        if self.mode == "projection" and not _qk_modules(model):
            raise ValueError(
                f"{self.name}: mode=projection found no attention module with q_proj/k_proj linear "
                f"layers in {type(model).__name__}; tie fused qkv layers with tie_fused_qkv_ or use "
                "mode=penalty"
            )

    def violation(self, inp: ConditionInput, training: bool) -> ViolationState:
        trace = _attention_trace(inp, "weights", self.name)
        return reversibility_violation(list(trace), key_mask=getattr(trace, "key_mask", None))

    @torch.no_grad()
    def project_(self, model) -> None:
        modules = _qk_modules(model)
        if not modules:
            raise ValueError(f"{self.name}: no attention module with q_proj/k_proj in {type(model).__name__}")
        for m in modules:
            if m.q_proj is m.k_proj:  # tied by construction
                continue
            tie_qk_(m.q_proj.weight, m.k_proj.weight, m.q_proj.bias, m.k_proj.bias)
