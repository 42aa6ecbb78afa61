"""BayesTransformer: a small transformer that is a *predictor* in bayestrain's convention.

``model(x)`` maps observations ``x: LongTensor[B, T]`` to ``logp: [B, T, V]`` where
``logp[:, t] = log p(X_{t+1} = . | x[:, :t])`` (DESIGN.md section 1).  Three layouts:

- ``causal``: a decoder over ``[BOS, x_0, ..., x_{T-2}]``; position ``t`` sees ``j <= t`` and
  predicts ``x_t``.  One pass gives every predictive.  Sinkhorn is refused here (its column
  update would let outputs see the future).
- ``set``: an in-context (PFN-style) encoder without positional encoding.  For a cut ``t`` the
  context ``[BOS, x_0..x_{t-1}]`` attends bidirectionally within itself and one QUERY token
  attends to the context only; its output is ``logp[:, t]``.  One context length per pass, so
  all ``T`` predictives are ``T`` passes batched together; training samples one cut per
  sequence.
- ``bidirectional``: the same construction with positional encodings.

Attention kinds: ``softmax`` (SDPA when no weights are needed) and ``sinkhorn``
(prior-consistent, ``bayestrain.attention.sinkhorn_attention``); ``tied_qk`` shares W_Q = W_K
per head (a reversible kernel by construction).  Read top to bottom: RoPE, attention, MLP,
block, model, then the branch predictive used by the martingale condition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayestrain.attention import sinkhorn_attention, softmax_attention

LAYOUTS = ("causal", "set", "bidirectional")
ATTENTIONS = ("softmax", "sinkhorn")
POS_ENCODINGS = ("none", "learned", "rope")
NORMS = ("layernorm", "rmsnorm", "none")
RESIDUALS = ("plain", "convex")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"BayesTransformer: {name}={value!r} is not one of {list(choices)}")


class AttentionTrace(list):
    """Per-layer attention read-outs (``[B, H, Q, K]`` weights or ``[B, H, K]`` key marginals),
    with what a block-level condition needs to interpret them: the log law of the queries
    ``log_rho: [B, Q]``, the visible keys ``key_mask: Bool[B, K]`` (True = a key some weighted
    query sees), per-layer Sinkhorn residuals ``KL(pi || mu): [B, H]`` where computed, and the
    layout."""

    def __init__(self, kind: str, layout: str):
        super().__init__()
        self.kind, self.layout = kind, layout
        self.log_rho: Tensor | None = None
        self.key_mask: Tensor | None = None
        self.residuals: list[Tensor] = []


# ----------------------------------------------------------------------------- RoPE
class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got {head_dim}")
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv  # (L, D/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        # x: (B, H, L, D), pos: (B, L) or (L,) integer positions
        cos, sin = self.cos[pos], self.sin[pos]  # (B, L, D/2) or (L, D/2)
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- layers
@dataclass
class _Ctx:
    """How the tokens of one pass attend: shared by every layer of the pass."""

    allowed: Tensor | None  # Bool[B or 1, 1, Q, K]; None = causal (SDPA is_causal)
    log_rho: Tensor | None  # [B, Q] law of the queries (None = uniform over valid rows)
    pos: Tensor  # (L,) or (B, L) positions for learned / rope encodings
    return_attn: str | None = None
    past: list | None = None  # per-layer (k, v) to prepend (causal branches)
    cache: list = field(default_factory=list)  # filled with per-layer (k, v) when asked
    want_cache: bool = False
    log_prior: Tensor | None = None  # [B, K] Sinkhorn prior over keys (None = uniform)
    n_context: Tensor | None = None  # [B] set layout: context length (the fused kernels' form)
    residuals: list = field(default_factory=list)  # per-layer Sinkhorn KL(pi || mu): [B, H]


class Norm(nn.Module):
    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(d)) if kind != "none" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], self.weight)
        return x


class SelfAttention(nn.Module):
    def __init__(self, d_model, n_heads, dropout, attention, n_iters, tied_qk, rotary, backend):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.attention, self.n_iters, self.backend = attention, n_iters, backend
        self.q_proj = nn.Linear(d_model, d_model)
        # tied: the key projection *is* the query projection (W_Q = W_K, biases alike)
        self.k_proj = self.q_proj if tied_qk else nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.rotary = rotary
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, C) -> (B, H, L, D)
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, h: Tensor, ctx: _Ctx, layer: int, trace: AttentionTrace | None):
        q, k, v = self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        if self.rotary is not None:
            q, k = self.rotary(q, ctx.pos), self.rotary(k, ctx.pos)
        if ctx.want_cache:
            ctx.cache.append((k, v))
        causal = ctx.allowed is None
        p = self.dropout if self.training else 0.0
        if ctx.past is not None:  # branch tokens see their cached prefix, then themselves
            out = _branch_attention(q, k, v, *ctx.past[layer], ctx.allowed)
        elif self.attention == "sinkhorn" and trace is None and ctx.n_context is not None:
            # no read-out needed: the set layout as n_context, which the fused kernel takes
            out, kl = sinkhorn_attention(
                q, k, v, log_prior=ctx.log_prior, n_context=ctx.n_context, n_iters=self.n_iters,
                backend=self.backend, return_residual=True,
            )  # (B, H, Q, D), (B, H)
            ctx.residuals.append(kl)
        elif self.attention == "sinkhorn":
            out, kl, w = sinkhorn_attention(
                q, k, v, log_prior=ctx.log_prior, log_query_weights=ctx.log_rho, attn_mask=ctx.allowed,
                n_iters=self.n_iters, backend="torch", return_residual=True, return_weights=True,
            )  # (B, H, Q, D), (B, H), (B, H, Q, K)
            ctx.residuals.append(kl)
            self._record(trace, w, kl, ctx)
        elif ctx.return_attn is None:  # fast path: no weights needed
            mask = None if causal else _sdpa_safe(ctx.allowed)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        else:
            out, mu, w = softmax_attention(
                q, k, v, log_query_weights=ctx.log_rho, attn_mask=ctx.allowed, causal=causal,
                backend="torch", return_weights=True,
            )
            self._record(trace, w, None, ctx)
        if p and (self.attention == "sinkhorn" or ctx.return_attn is not None):
            out = F.dropout(out, p)  # weights were needed: dropout on the head outputs instead
        B, H, L, D = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))

    @staticmethod
    def _record(trace, w, kl, ctx):
        if trace is None:
            return
        if trace.kind == "weights":
            trace.append(w)
        else:  # key marginal mu_j = sum_i rho_i A_ij
            rho = trace.log_rho.exp()[:, None, :, None]  # (B, 1, Q, 1)
            trace.append((rho * w).sum(-2))  # (B, H, K)
        if kl is not None:
            trace.residuals.append(kl)


def _branch_attention(q, k, v, pk, pv, see_prefix):
    """Single-token branches: query ``i`` (``q: [B, H, N, D]``) sees the prefix keys
    ``pk: [B, H, T, D]`` where ``see_prefix[i]`` and its own key ``k[:, :, i]``.  The self
    score is computed on its own, so memory is ``N x T``, not ``N x (T + N)``."""
    scale = q.shape[-1] ** -0.5
    s_pre = (q @ pk.transpose(-1, -2)) * scale  # (B, H, N, T)
    s_pre = s_pre.masked_fill(~see_prefix, float("-inf"))
    s_self = (q * k).sum(-1, keepdim=True) * scale  # (B, H, N, 1)
    s = torch.cat([s_pre, s_self], -1)
    w = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), -1).to(q.dtype)
    return w[..., :-1] @ pv + w[..., -1:] * v  # (B, H, N, D)


def _sdpa_safe(allowed: Tensor) -> Tensor:
    """SDPA returns NaN for a row that sees nothing; let such (padded) rows see key 0.  Their
    outputs are never read: no valid row attends to a padded position."""
    empty = ~allowed.any(-1, keepdim=True)
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    return allowed | (empty & first)


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm block.  ``residual='convex'``: ``h <- (1 - a) h + a f(h)`` with ``a`` in [0, 1]
    (kept there by ``clamp_mixing_()`` after each optimizer step), so each layer is a mixture
    of kernels; the plain residual ``h + f(h)`` is not."""

    def __init__(self, d_model, n_heads, dropout, norm, attention, n_iters, tied_qk, rotary, residual, backend):
        super().__init__()
        self.ln1, self.ln2 = Norm(norm, d_model), Norm(norm, d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, attention, n_iters, tied_qk, rotary, backend)
        self.mlp = MLP(d_model, dropout)
        self.convex = residual == "convex"
        if self.convex:
            self.mix = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, h, ctx, layer, trace):
        a = self.attn(self.ln1(h), ctx, layer, trace)
        h = h + a if not self.convex else torch.lerp(h, a, self.mix[0])
        m = self.mlp(self.ln2(h))
        return h + m if not self.convex else torch.lerp(h, m, self.mix[1])


# ----------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    logp: Tensor  # (B, T, V) float32 log-predictives
    attn: AttentionTrace | None = None
    cache: list | None = None  # causal: per-layer (k, v) of [BOS, x_0..x_{T-2}]
    residual: Tensor | None = None  # Sinkhorn: mean final KL(pi || mu) over layers, heads, batch


class BayesTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 256,
        pos_encoding: str = "learned",
        dropout: float = 0.0,
        norm: str = "layernorm",
        layout: str = "causal",
        attention: str = "softmax",
        n_iters: int = 3,
        tied_qk: bool = False,
        residual: str = "plain",
        backend: str = "auto",
        prior: str | list[float] = "uniform",
    ):
        super().__init__()
        for name, value, choices in [
            ("layout", layout, LAYOUTS), ("attention", attention, ATTENTIONS),
            ("pos_encoding", pos_encoding, POS_ENCODINGS), ("norm", norm, NORMS),
            ("residual", residual, RESIDUALS),
        ]:
            _choice(name, value, choices)
        if vocab_size < 2:
            raise ValueError(f"BayesTransformer: vocab_size must be >= 2, got {vocab_size}")
        if attention == "sinkhorn" and layout == "causal":
            raise ValueError(
                "BayesTransformer: attention='sinkhorn' is undefined under a causal mask (its column "
                "update sums over later queries, so outputs would see future tokens); use "
                "layout='set' or 'bidirectional', or keep attention='softmax' and train the "
                "prior_consistency condition in penalty/lagrangian mode with prior='causal_uniform'"
            )
        if layout == "set" and pos_encoding != "none":
            raise ValueError(
                f"BayesTransformer: layout='set' has no positional encoding (got "
                f"pos_encoding={pos_encoding!r}); set pos_encoding=none or use layout='bidirectional'"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BayesTransformer: dropout must be in [0, 1), got {dropout}")
        # Sinkhorn prior over key *positions*: "uniform" over the visible context, or fixed
        # weights [max_len] (renormalised over each context's visible keys: the declared prior
        # conditioned on the context length, never on the tokens)
        if isinstance(prior, str):
            if prior != "uniform":
                raise ValueError(f"BayesTransformer: prior={prior!r} must be 'uniform' or a list of {max_len} weights")
            self.register_buffer("log_prior", None)
        else:
            w = torch.as_tensor(list(prior), dtype=torch.float32)
            if w.shape != (max_len,) or (w <= 0).any():
                raise ValueError(
                    f"BayesTransformer: a fixed prior must be {max_len} positive weights (one per key "
                    f"position up to max_len), got shape {tuple(w.shape)}"
                )
            self.register_buffer("log_prior", w.log())
        self.vocab_size, self.layout, self.attention = vocab_size, layout, attention
        self.max_len, self.pos_encoding = max_len, pos_encoding
        self.bos, self.query = vocab_size, vocab_size + 1  # special tokens after the data
        self.tok_emb = nn.Embedding(vocab_size + 2, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model) if pos_encoding == "learned" else None
        rotary = Rotary(d_model // n_heads, max_len) if pos_encoding == "rope" else None
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, dropout, norm, attention, n_iters, tied_qk, rotary, residual, backend)
            for _ in range(n_layers)
        )
        self.ln_f = Norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.drop = nn.Dropout(dropout)

    # -- the public predictor --------------------------------------------------------
    def forward(self, x: Tensor, return_attn: str | None = None):
        """``logp: [B, T, V]``; with ``return_attn`` in {"weights", "marginals"} also the
        per-layer :class:`AttentionTrace`."""
        out = self.run(x, return_attn=return_attn)
        return out.logp if return_attn is None else (out.logp, out.attn)

    def run(self, x: Tensor, return_attn: str | None = None, return_cache: bool = False,
            cut: Tensor | None = None) -> ModelOutput:
        """One pass.  ``cut: LongTensor[B]`` (set/bidirectional only) computes the single
        predictive ``logp[b, cut_b]`` per sequence, returned as ``[B, 1, V]``."""
        self._check_input(x)
        if return_attn not in (None, "weights", "marginals"):
            raise ValueError(f"return_attn must be None, 'weights' or 'marginals', got {return_attn!r}")
        if self.layout == "causal":
            if cut is not None:
                raise ValueError("cut= is for set/bidirectional layouts; a causal pass gives every t")
            return self._run_causal(x, return_attn, return_cache)
        B, T = x.shape
        if cut is None:  # every context length, batched: (B*T) passes of length T+1
            cuts = torch.arange(T, device=x.device).repeat(B)
            out = self._run_set(x.repeat_interleave(T, 0), cuts, return_attn)
            out.logp = out.logp.view(B, T, -1)
            return out
        return self._run_set(x, cut, return_attn)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"x must be an integer tensor [B, T], got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] + 1 > self.max_len:
            raise ValueError(
                f"sequence length {x.shape[1]} needs max_len >= {x.shape[1] + 1}, model has "
                f"max_len={self.max_len}; raise model.max_len"
            )

    def _law_dtype(self) -> torch.dtype:
        """Query/key laws in float32 or wider (float64 for a float64 model)."""
        return torch.promote_types(self.tok_emb.weight.dtype, torch.float32)

    def _embed(self, tokens: Tensor, pos: Tensor) -> Tensor:
        h = self.tok_emb(tokens)  # (B, L, C)
        if self.pos_emb is not None:
            h = h + self.pos_emb(pos)
        return self.drop(h)

    def _trunk(self, h: Tensor, ctx: _Ctx, trace: AttentionTrace | None) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, ctx, i, trace)
        logits = self.head(self.ln_f(h))
        work = torch.promote_types(logits.dtype, torch.float32)
        return torch.log_softmax(logits.to(work), dim=-1)  # (B, L, V), float32+ whatever AMP does

    def _run_causal(self, x, return_attn, return_cache) -> ModelOutput:
        B, T = x.shape
        bos = x.new_full((B, 1), self.bos)
        tokens = torch.cat([bos, x[:, :-1]], dim=1)  # (B, T): position t predicts x_t
        pos = torch.arange(T, device=x.device)
        ctx = _Ctx(allowed=None, log_rho=None, pos=pos, return_attn=return_attn, want_cache=return_cache)
        trace = None
        if return_attn is not None:
            trace = AttentionTrace(return_attn, "causal")
            trace.log_rho = torch.full((B, T), -math.log(T), device=x.device, dtype=self._law_dtype())
            trace.key_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
            ctx.log_rho = trace.log_rho
        logp = self._trunk(self._embed(tokens, pos), ctx, trace)
        return ModelOutput(logp, trace, ctx.cache if return_cache else None)

    def _run_set(self, x, cut, return_attn) -> ModelOutput:
        # sequence: [BOS, x_0 .. x_{T-2}, QUERY]; context = positions 0..cut, QUERY at index T
        B, T = x.shape
        L = T + 1
        tokens = torch.cat([x.new_full((B, 1), self.bos), x[:, :-1], x.new_full((B, 1), self.query)], 1)
        idx = torch.arange(L, device=x.device)
        in_ctx = idx[None, :] <= cut[:, None]  # (B, L) context keys / queries
        is_query = (idx == T)[None, :].expand(B, L)
        allowed = (in_ctx | is_query)[:, :, None] & in_ctx[:, None, :]  # (B, Q, K)
        n_ctx = (cut + 1).to(self._law_dtype())
        log_rho = torch.where(in_ctx, -torch.log(n_ctx)[:, None], float("-inf"))  # (B, L)
        pos = torch.where(is_query, cut[:, None] + 1, idx[None, :].expand(B, L))
        log_prior = None
        if self.log_prior is not None:
            lp = self.log_prior[:L].masked_fill(~in_ctx, float("-inf"))  # (B, L)
            log_prior = lp - torch.logsumexp(lp, -1, keepdim=True)
        ctx = _Ctx(allowed=allowed[:, None], log_rho=log_rho, pos=pos, return_attn=return_attn,
                   log_prior=log_prior, n_context=cut + 1)
        trace = None
        if return_attn is not None:
            trace = AttentionTrace(return_attn, self.layout)
            trace.log_rho, trace.key_mask = log_rho, in_ctx
        logp = self._trunk(self._embed(tokens, pos), ctx, trace)
        residual = torch.stack(ctx.residuals).mean() if ctx.residuals else None
        return ModelOutput(logp[:, T:], trace, residual=residual)  # (B, 1, V): the QUERY token's predictive

    # -- branches: the predictive after appending a candidate, prefix computed once ----------
    def branch_logp(self, x: Tensor, t: int, y: Tensor) -> Tensor:
        """``[B, len(y), V]``: the predictive at ``t+1`` after appending each candidate ``y`` to
        ``x[:, :t]``."""
        B = x.shape[0]
        pos = torch.tensor([t], device=x.device)
        return self.branch_logp_many(x, pos, y.view(1, 1, -1).expand(B, 1, -1))[:, 0]

    def branch_logp_many(self, x: Tensor, positions: Tensor, y: Tensor, cache: list | None = None) -> Tensor:
        """``[B, P, K, V]``: for each position ``t = positions[p]`` and candidate ``y[b, p, k]``,
        ``log p(X_{t+2} = . | x[b, :t], X_{t+1} = y[b, p, k])``.

        Causal: the prefix keys/values come from one pass over ``x`` (or ``cache``, the main
        pass's own, so training pays only for the branch tokens).  Each branch token attends to
        its prefix and itself; all P*K branches run as one batch of single tokens.
        """
        B, P, K = y.shape
        if self.layout != "causal":
            return self._branch_set(x, positions, y)
        T = x.shape[1]
        if cache is None:
            if int(positions.max()) >= T:  # cache covers prefixes of length <= T-1
                x = torch.cat([x, x[:, :1]], dim=1)
            cache = self.run(x, return_cache=True).cache
        n_prefix = cache[0][0].shape[2]
        tokens = y.reshape(B, P * K)
        bpos = (positions + 1).repeat_interleave(K)  # (P*K,) the branch token's position
        # branch (p, k) sees prefix keys j <= t_p and itself
        see_prefix = torch.arange(n_prefix, device=x.device)[None, :] <= positions.repeat_interleave(K)[:, None]
        ctx = _Ctx(allowed=see_prefix, log_rho=None, pos=bpos, past=cache)  # (P*K, T)
        logp = self._trunk(self._embed(tokens, bpos), ctx, None)  # (B, P*K, V)
        return logp.view(B, P, K, -1)

    def _branch_set(self, x, positions, y):
        # context x[:, :t] + y, predicted at cut t+1: one pass per (p, k), batched
        B, P, K = y.shape
        T = x.shape[1]
        L = max(T, int(positions.max()) + 2)
        xb = torch.zeros(B, P, K, L, dtype=x.dtype, device=x.device)
        xb[..., :T] = x[:, None, None, :]
        idx = torch.arange(L, device=x.device)
        t = positions.view(1, P, 1, 1)
        xb = torch.where(idx == t, y[..., None], xb)  # x[:, t] <- y
        cut = (positions + 1).view(1, P, 1).expand(B, P, K).reshape(-1)
        return self._run_set(xb.view(B * P * K, L), cut, None).logp.view(B, P, K, -1)

    # -- in-place mutators, called after optimizer steps ---------------------------------
    @torch.no_grad()
    def clamp_mixing_(self) -> None:
        for block in self.blocks:
            if block.convex:
                block.mix.clamp_(0.0, 1.0)
