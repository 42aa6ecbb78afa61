"""Sequence-level conditions: the predictor behaves as a Bayes process (DESIGN.md 2.1).

- ``exchangeability``: ``E_s |log p(x) - log p(x o s)| / T`` logged, ``E_s ((.)/T)^2`` penalised.
- ``martingale``: ``m_t = sum_y p_t(y) q_y`` must equal ``p_t``; ``kl`` = KL(p_t || m_t) (exact),
  ``l2`` = ||p_t - m_t||^2 exact, or an unbiased signed estimate from 2K sampled branches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bayestrain.conditions.base import Condition, ConditionInput, ViolationState

def _predict(predictor, x: Tensor) -> Tensor:
    out = predictor(x)
    return out[0] if isinstance(out, tuple) else out


def joint_logp(logp: Tensor, x: Tensor) -> Tensor:
    """``log p(x) = sum_t logp[b, t, x[b, t]]``: ``[B]``."""
    return logp.gather(-1, x[..., None]).squeeze(-1).sum(-1)


def _rand(shape, generator, device) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


# ----------------------------------------------------------------------------- exchangeability
def exchangeability_violation(
    predictor,
    x: Tensor,
    logp: Tensor | None = None,
    num_permutations: int = 1,
    generator: torch.Generator | None = None,
    fixed_prefix: int = 0,
    unit_length: int = 1,
) -> ViolationState:
    """Compare ``log p(x)`` with ``log p(x o s)`` for uniform random permutations ``s`` of the
    exchangeable positions (after ``fixed_prefix``, in blocks of ``unit_length``), one
    independent permutation per sequence and draw.  ``logp`` of ``x`` is reused when given.
    Value: ``E_s |d|`` with ``d = (log p(x) - log p(x o s)) / T`` (nats per observation);
    violation: ``E_s d^2``."""
    B, T = x.shape
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    n_free = T - fixed_prefix
    if fixed_prefix < 0 or unit_length < 1 or n_free < 0 or n_free % unit_length:
        raise ValueError(
            f"exchangeability: the positions after fixed_prefix={fixed_prefix} ({n_free} of T={T}) "
            f"must split into whole units of unit_length={unit_length}; choose a sequence length "
            "that fits"
        )
    if logp is None:
        logp = _predict(predictor, x)
    n_units = n_free // unit_length
    S = num_permutations
    order = _rand((S * B, n_units), generator, x.device).argsort(-1)  # (S*B, n_units)
    tok = (order[..., None] * unit_length + torch.arange(unit_length, device=x.device)).flatten(1)
    head = torch.arange(fixed_prefix, device=x.device).expand(S * B, fixed_prefix)
    idx = torch.cat([head, tok + fixed_prefix], dim=1)  # (S*B, T)
    x_rep = x.repeat(S, 1)
    x_perm = x_rep.gather(1, idx)
    lp = joint_logp(logp, x).repeat(S)  # (S*B,)
    lp_perm = joint_logp(_predict(predictor, x_perm), x_perm)
    d = (lp - lp_perm) / T
    return ViolationState(violation=(d**2).mean(), value=d.detach().abs().mean())


# ----------------------------------------------------------------------------- martingale
def _branch_logp(predictor, x: Tensor, positions: Tensor, y: Tensor, cache=None) -> Tensor:
    """``[B, P, K, V]``: log-predictive after ``x[:, :t_p]`` then ``y[b, p, k]``.  Uses the
    predictor's shared-prefix ``branch_logp_many`` when it has one; otherwise re-runs every
    prefix (the naive fallback)."""
    if hasattr(predictor, "branch_logp_many"):
        return predictor.branch_logp_many(x, positions, y, cache=cache)
    B, P, K = y.shape
    L = int(positions.max()) + 2
    xb = torch.zeros(B, P, K, L, dtype=x.dtype, device=x.device)
    n = min(L, x.shape[1])
    xb[..., :n] = x[:, None, None, :n]
    idx = torch.arange(L, device=x.device)
    t = positions.view(1, P, 1, 1)
    xb = torch.where(idx == t, y[..., None], xb).masked_fill(idx > t, 0)
    logp = _predict(predictor, xb.view(B * P * K, L)).view(B, P, K, L, -1)
    return logp.gather(3, (t + 1).expand(B, P, K, 1)[..., None].expand(-1, -1, -1, -1, logp.shape[-1])).squeeze(3)


def martingale_violation(
    predictor,
    x: Tensor,
    positions=None,
    kind: str = "kl",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    logp: Tensor | None = None,
    cache: list | None = None,
) -> ViolationState:
    """Martingale condition (Falck, Wang & Holmes, ICML 2024) at ``positions`` (default every
    ``t`` in ``0..T-2``): ``p_t = p(X_{t+1} | x_{:t})``, ``q_y = p(X_{t+2} | x_{:t}, y)`` and
    ``m_t = sum_y p_t(y) q_y``.

    ``kind="kl"``: ``KL(p_t || m_t)`` over all ``V`` branches (>= 0).  ``kind="l2"``:
    ``||p_t - m_t||^2``, exact, or with ``num_samples=K`` from two independent sets of ``K``
    branches ``y ~ p_t``: ``m_hat = mean_k [p_t(y_k) / stopgrad p_t(y_k)] q_{y_k}`` and value
    ``(p_t - m_hat_1) . (p_t - m_hat_2)``, unbiased in value and gradient, signed, never clamped.
    ``logp`` (of ``x``) and ``cache`` (the causal model's per-layer keys/values of the same pass)
    are reused when given.  Mean over batch and positions.
    """
    if kind not in ("kl", "l2"):
        raise ValueError(f"martingale kind must be 'kl' or 'l2', got {kind!r}")
    if num_samples is not None and kind != "l2":
        raise ValueError("martingale: num_samples (sampled branches) needs kind='l2'; KL has no unbiased estimate")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"martingale: num_samples must be >= 1 or None (exact), got {num_samples}")
    B, T = x.shape
    if positions is None:
        positions = torch.arange(T - 1, device=x.device)
    positions = torch.as_tensor(positions, device=x.device, dtype=torch.long).flatten()
    if logp is None:
        logp = _predict(predictor, x)
    logp_t = logp[:, positions]  # (B, P, V)
    V = logp_t.shape[-1]
    P = positions.shape[0]

    if num_samples is None:
        y = torch.arange(V, device=x.device).expand(B, P, V)
        log_q = _branch_logp(predictor, x, positions, y, cache)  # (B, P, V_y, V)
        log_m = torch.logsumexp(logp_t[..., None] + log_q, dim=-2)  # (B, P, V)
        p_t = logp_t.exp()
        if kind == "kl":
            # p log(p/m) with 0 log 0 = 0, gradient finite where p underflows
            per = (p_t * (logp_t - log_m).masked_fill(p_t == 0, 0.0)).sum(-1)
        else:
            per = ((p_t - log_m.exp()) ** 2).sum(-1)
        mean = per.mean()
        return ViolationState(violation=mean, value=mean.detach())

    K = num_samples
    p_t = logp_t.exp()  # (B, P, V)
    flat = p_t.detach().reshape(B * P, V).to(torch.float64)
    gdev = generator.device if generator is not None else flat.device
    y = torch.multinomial(flat.to(gdev), 2 * K, replacement=True, generator=generator).to(x.device)
    y = y.view(B, P, 2 * K)
    q = _branch_logp(predictor, x, positions, y, cache).exp()  # (B, P, 2K, V)
    p_y = p_t.gather(-1, y)  # (B, P, 2K)
    w = p_y / p_y.detach()  # = 1 in value; carries the score-function gradient
    m_hat = (w[..., None] * q).view(B, P, 2, K, V).mean(3)  # (B, P, 2, V)
    per = ((p_t - m_hat[:, :, 0]) * (p_t - m_hat[:, :, 1])).sum(-1)
    mean = per.mean()
    return ViolationState(violation=mean, value=mean.detach())


class _SequenceCondition(Condition):
    """Sequence-level: needs an exchangeable task (i.i.d. data given the parameter)."""

    def __init__(self, *, train_subset: int | None = 8, **kw):
        super().__init__(**kw)
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"{self.name}: train_subset must be >= 1 or null (whole batch), got {train_subset}")
        self.train_subset = train_subset

    def check(self, model, task) -> None:
        if task is not None and not getattr(task, "exchangeable", True):
            raise ValueError(
                f"condition '{self.name}' needs an exchangeable task (i.i.d. observations given a "
                f"parameter), but task {type(task).__name__} is not; drop the condition "
                "(condition=none) or pick an exchangeable task (coin, dirichlet, mixture)"
            )

    def _subset(self, inp: ConditionInput, training: bool):
        n = self.train_subset if training else None
        if n is None or n >= inp.x.shape[0]:
            return inp.x, inp.logp, inp.cache
        cache = None if inp.cache is None else [(k[:n], v[:n]) for k, v in inp.cache]
        return inp.x[:n], None if inp.logp is None else inp.logp[:n], cache


class Exchangeability(_SequenceCondition):
    name = "exchangeability"

    def __init__(self, num_permutations: int = 1, eval_permutations: int = 4, fixed_prefix: int = 0,
                 unit_length: int = 1, **kw):
        super().__init__(**kw)
        self.num_permutations, self.eval_permutations = num_permutations, eval_permutations
        self.fixed_prefix, self.unit_length = fixed_prefix, unit_length

    def check(self, model, task) -> None:
        super().check(model, task)
        if task is not None:  # the task's own declared symmetry wins
            self.fixed_prefix = getattr(task, "fixed_prefix", self.fixed_prefix)
            self.unit_length = getattr(task, "unit_length", self.unit_length)

    def violation(self, inp: ConditionInput, training: bool) -> ViolationState:
        x, logp, _ = self._subset(inp, training)
        return exchangeability_violation(
            inp.model, x, logp=logp,
            num_permutations=self.num_permutations if training else self.eval_permutations,
            generator=inp.generator, fixed_prefix=self.fixed_prefix, unit_length=self.unit_length,
        )


class Martingale(_SequenceCondition):
    name = "martingale"
    needs_cache = True

    def __init__(self, kind: str = "kl", num_samples: int | None = None, train_positions: int | None = 4, **kw):
        super().__init__(**kw)
        if kind not in ("kl", "l2"):
            raise ValueError(f"martingale: kind must be 'kl' or 'l2', got {kind!r}")
        if num_samples is not None and kind != "l2":
            raise ValueError("martingale: num_samples (sampled branches) needs kind='l2'")
        if train_positions is not None and train_positions < 1:
            raise ValueError(f"martingale: train_positions must be >= 1 or null (all), got {train_positions}")
        self.kind, self.num_samples, self.train_positions = kind, num_samples, train_positions
        self.name = "martingale" if kind == "kl" else "martingale_l2"

    def violation(self, inp: ConditionInput, training: bool) -> ViolationState:
        x, logp, cache = self._subset(inp, training)
        T = x.shape[1]
        positions = None
        if training and self.train_positions is not None and self.train_positions < T - 1:
            r = _rand((T - 1,), inp.generator, x.device)
            positions = r.argsort()[: self.train_positions].sort().values
        return martingale_violation(
            inp.model, x, positions=positions, kind=self.kind,
            num_samples=self.num_samples if training else None,
            generator=inp.generator, logp=logp, cache=cache,
        )
