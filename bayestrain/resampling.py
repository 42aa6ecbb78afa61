"""Posterior by predictive resampling (DESIGN.md section 5; Fong, Holmes & Walker 2023).

From a context ``x[:, :n]`` a predictor is rolled forward ``H`` steps, ``S`` times: each roll
draws ``X_{n+1} ~ p_n``, appends it, draws ``X_{n+2} ~ p_{n+1}``, ... and keeps the predictive
``p_{n+H}`` at the end.  The ``S`` end points are draws from the predictor's implied law of the
predictive after ``H`` more observations; as ``H`` grows it tends to the predictor's posterior
over ``theta`` (a martingale posterior).

At finite ``H`` that law is narrower than the posterior, so it is compared with the same
object under the exact Bayes predictor: for ``Dirichlet`` / ``Coin`` a Polya urn, whose law of
``p_{n+H}`` is known exactly, per coordinate ``v``::

    p_{n+H, v} = (alpha_v + c_v + K_v) / (sum(alpha) + n + H),
    K_v ~ BetaBinomial(H, alpha_v + c_v, sum(alpha) + n - alpha_v - c_v)

(``c`` the context counts).  The comparison reports, per coordinate, the Wasserstein-1
distance between the predictor's ``S`` draws and that exact law (computed exactly from the
Beta-binomial pmf, not sampled) and how often the true ``theta`` falls in the predictor's
central 50/80/90% intervals against how often it falls in the exact law's.  For tasks without
a closed form (``Mixture``) the reference is the exact Bayes predictor resampled the same way.

Public functions::

    predictive_resample(predictor, context, horizon, num_samples, generator=None)  # [S, B, V]
    polya_urn_law(alpha, context, horizon)            # atoms, pmf: [B, V, H+1] each
    wasserstein1(samples, atoms=None, weights=None)   # per row, exact for step functions
    central_interval(values, level, weights=None)     # lower/upper inverse-CDF quantiles
    compare_posterior(predictor, task, ...)           # PosteriorComparison (.summary(), .table())
    posterior_figure(comparison)                      # matplotlib Figure (Agg, no pyplot)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LEVELS",
    "predictive_resample",
    "polya_urn_law",
    "dirichlet_alpha",
    "wasserstein1",
    "expected_w1_floor",
    "central_interval",
    "coverage",
    "PosteriorComparison",
    "compare_posterior",
    "posterior_figure",
]

LEVELS = (0.5, 0.8, 0.9)


# ----------------------------------------------------------------------------- rolling
def _logp_out(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _is_transformer(predictor, layout: str | None = None) -> bool:
    lay = getattr(predictor, "layout", None)
    ok = lay in ("causal", "set", "bidirectional") and hasattr(predictor, "run")
    return ok and (layout is None or lay == layout)


def _next_logp(predictor, x: Tensor) -> Tensor:
    """``log p(X_{n+1} = . | x)`` for ``x: [N, n]`` -> ``[N, V]`` by one plain pass.

    The predictor convention puts the predictive after ``n`` tokens at row ``n``, so the pass
    runs on ``x`` plus one placeholder token (never seen by row ``n``)."""
    N, n = x.shape
    x_ext = torch.cat([x, x.new_zeros(N, 1)], dim=1)
    if _is_transformer(predictor) and predictor.layout != "causal":  # one cut, not all n+1
        cut = torch.full((N,), n, dtype=torch.long, device=x.device)
        return predictor.run(x_ext, cut=cut).logp[:, 0]
    return _logp_out(predictor(x_ext))[:, n]


def _draw(logp: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of one token per row of ``logp: [N, V]`` from uniforms ``u: [N]``."""
    p = logp.double().exp()
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, u.double()[:, None], right=True)[:, 0].clamp_(max=p.shape[-1] - 1)


class _CachedRoller:
    """Incremental decoding for the causal ``BayesTransformer``: one pass over the context, then
    one token per step against the per-layer key/value cache (the same machinery the model
    uses for its martingale branches).  ``None`` from :meth:`build` when the model does not
    offer it."""

    def __init__(self, model, ctx_cls):
        self.model, self._Ctx = model, ctx_cls

    @classmethod
    def build(cls, model):
        if not _is_transformer(model, "causal"):
            return None
        try:
            from bayestrain.model import _Ctx
        except ImportError:
            return None
        if not all(hasattr(model, a) for a in ("_embed", "_trunk")):
            return None
        return cls(model, _Ctx)

    def start(self, x: Tensor, horizon: int) -> tuple[Tensor, dict]:
        """One pass over ``[BOS] + x``; the per-layer keys/values go into buffers with room for
        ``horizon`` more tokens (written in place: no per-step concatenation)."""
        N, n = x.shape
        out = self.model.run(torch.cat([x, x.new_zeros(N, 1)], 1), return_cache=True)
        L0 = n + 1
        bufs = []
        for k, v in out.cache:
            kb = k.new_zeros(*k.shape[:2], L0 + horizon, k.shape[-1])
            vb = v.new_zeros(*v.shape[:2], L0 + horizon, v.shape[-1])
            kb[:, :, :L0], vb[:, :, :L0] = k, v
            bufs.append((kb, vb))
        return out.logp[:, n], {"bufs": bufs, "len": L0}

    def step(self, state: dict, y: Tensor) -> tuple[Tensor, dict]:
        """Append ``y: [N]`` at the next position; ``log p`` of the following token ``[N, V]``."""
        L, bufs = state["len"], state["bufs"]  # BOS + tokens so far: y sits at position L
        pos = torch.tensor([L], device=y.device)
        see = (torch.arange(bufs[0][0].shape[2], device=y.device) < L)[None, :]  # (1, L_max)
        ctx = self._Ctx(allowed=see, log_rho=None, pos=pos, past=bufs, want_cache=True)
        logp = self.model._trunk(self.model._embed(y[:, None], pos), ctx, None)[:, 0]
        for (kb, vb), (k1, v1) in zip(bufs, ctx.cache):
            kb[:, :, L : L + 1] = k1
            vb[:, :, L : L + 1] = v1
        return logp, {"bufs": bufs, "len": L + 1}


@torch.no_grad()
def predictive_resample(
    predictor,
    context: Tensor,
    horizon: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    cache: str | bool = "auto",
    max_rows: int = 65536,
    return_paths: bool = False,
):
    """Roll ``predictor`` forward ``horizon`` steps, ``num_samples`` times, from each context.

    Args:
        predictor: maps ``x: [N, T]`` to ``logp: [N, T, V]`` (DESIGN.md section 1).
        context: ``LongTensor[B, n]`` observed tokens (``n >= 0``).
        horizon: ``H >= 0`` future observations to draw.
        num_samples: ``S >= 1`` independent rolls per context.
        generator: seeds every draw (the uniforms are drawn up front, so the result does not
            depend on ``max_rows``).
        cache: ``"auto"`` uses the causal ``BayesTransformer``'s key/value cache (one pass over
            the context, then one token per step) after checking its first step against a
            plain pass, falling back to plain re-runs otherwise; ``True`` forces it, ``False``
            re-runs the whole prefix every step.
        max_rows: at most this many of the ``S * B`` rolls run at once (memory bound); the
            rolls are vectorised over samples and contexts, the only loop is over ``H``.
        return_paths: also return the drawn tokens ``[S, B, H]``.

    Returns:
        ``p_{n+H}`` as float64 probabilities ``[S, B, V]`` (draw ``s`` of context ``b``), and
        the paths when asked.  ``horizon=0`` gives the predictive at the context ``S`` times.
    """
    if context.dim() != 2 or context.dtype.is_floating_point:
        raise ValueError(f"context must be a LongTensor [B, n], got {context.dtype} {tuple(context.shape)}")
    if horizon < 0 or num_samples < 1:
        raise ValueError(f"need horizon >= 0 and num_samples >= 1, got horizon={horizon}, num_samples={num_samples}")
    if cache not in ("auto", True, False):
        raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
    B, n = context.shape
    S, H = num_samples, horizon
    max_len = getattr(predictor, "max_len", None)
    if max_len is not None and n + H + 2 > max_len:
        raise ValueError(
            f"predictive_resample: context length n={n} plus horizon H={H} needs a model with "
            f"max_len >= {n + H + 2}, this one has max_len={max_len}; lower posterior_h or posterior_n"
        )
    was_training = getattr(predictor, "training", False)
    if hasattr(predictor, "eval"):
        predictor.eval()
    try:
        device = context.device
        gdev = generator.device if generator is not None else device
        u = torch.rand(H, S * B, dtype=torch.float64, generator=generator, device=gdev).to(device)
        x = context.long().repeat(S, 1)  # row s*B + b: roll s of context b
        roller = _CachedRoller.build(predictor) if cache in ("auto", True) else None
        if cache is True and roller is None:
            raise ValueError("cache=True needs a causal BayesTransformer (a key/value cache); use cache='auto'")
        finals, paths = [], []
        for lo in range(0, S * B, max_rows):
            rows = slice(lo, min(lo + max_rows, S * B))
            use_cache = roller is not None
            if use_cache and cache == "auto" and lo == 0 and H > 0:
                use_cache = roller = _check_cached(roller, predictor, x[rows][:8], u[0, rows][:8])
            p, path = _roll(predictor, x[rows], u[:, rows], roller if use_cache else None)
            finals.append(p)
            paths.append(path)
        p_final = torch.cat(finals).view(S, B, -1)
        if return_paths:
            return p_final, torch.cat(paths).view(S, B, H)
        return p_final
    finally:
        if was_training and hasattr(predictor, "train"):
            predictor.train(True)


def _roll(predictor, x: Tensor, u: Tensor, roller) -> tuple[Tensor, Tensor]:
    H = u.shape[0]
    drawn = []
    if roller is not None:
        logp, kv = roller.start(x, H)
        for h in range(H):
            y = _draw(logp, u[h])
            drawn.append(y)
            logp, kv = roller.step(kv, y)
    else:
        logp = _next_logp(predictor, x)
        for h in range(H):
            y = _draw(logp, u[h])
            drawn.append(y)
            x = torch.cat([x, y[:, None]], 1)
            logp = _next_logp(predictor, x)
    path = torch.stack(drawn, 1) if drawn else x.new_zeros(x.shape[0], 0)
    p = logp.double().exp()
    return p / p.sum(-1, keepdim=True), path


def _check_cached(roller, predictor, x: Tensor, u: Tensor):
    """The cached path's first step against a plain pass; ``None`` (with a warning) if they
    disagree or the cached path fails (e.g. the model's internals changed)."""
    try:
        logp, kv = roller.start(x, 1)
        y = _draw(logp, u)
        got, _ = roller.step(kv, y)
        want = _next_logp(predictor, torch.cat([x, y[:, None]], 1))
        if torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-4):
            return roller
        warnings.warn("predictive_resample: the key/value-cached roll disagrees with a plain pass; "
                      "re-running the prefix every step instead", stacklevel=3)
    except Exception as err:  # noqa: BLE001 - any failure means: use the plain path
        warnings.warn(f"predictive_resample: cached roll unavailable ({type(err).__name__}: {err}); "
                      "re-running the prefix every step instead", stacklevel=3)
    return None


# ----------------------------------------------------------------------------- exact law
def dirichlet_alpha(task) -> Tensor:
    """The concentration vector ``[V]`` (float64) of a ``Dirichlet`` or ``Coin`` wind tunnel."""
    from bayestrain.tasks import Dirichlet

    if not isinstance(task, Dirichlet):
        raise ValueError(
            f"the exact Polya-urn law exists for Dirichlet and Coin wind tunnels, not "
            f"{type(task).__name__}; compare with the exact Bayes predictor resampled instead "
            "(compare_posterior does this for other tasks)"
        )
    a = task.alpha
    if isinstance(a, (int, float)):
        return torch.full((task.vocab_size,), float(a), dtype=torch.float64)
    return torch.tensor(list(a), dtype=torch.float64)


def polya_urn_law(alpha: Tensor, context: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """Exact per-coordinate law of ``p_{n+H}`` under the Dirichlet-multinomial Bayes predictor.

    Args:
        alpha: ``[V]`` Dirichlet concentrations.
        context: ``LongTensor[B, n]`` observed tokens.
        horizon: ``H >= 0``.

    Returns:
        ``atoms, pmf``: ``[B, V, H+1]`` float64 each; atom ``k`` of coordinate ``v`` is
        ``(alpha_v + c_v + k) / (sum alpha + n + H)`` with Beta-binomial probability
        ``C(H, k) B(a + k, b + H - k) / B(a, b)``, ``a = alpha_v + c_v``,
        ``b = sum alpha + n - a``.  Atoms increase with ``k``.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64).to(context.device)
    V = alpha.shape[0]
    B, n = context.shape
    H = int(horizon)
    counts = torch.nn.functional.one_hot(context.long(), V).sum(1).to(torch.float64) if n else \
        torch.zeros(B, V, dtype=torch.float64, device=context.device)
    a = alpha + counts  # (B, V)
    b = alpha.sum() + n - a
    k = torch.arange(H + 1, dtype=torch.float64, device=context.device)  # (H+1,)
    lg = torch.lgamma
    log_choose = lg(torch.tensor(H + 1.0, dtype=torch.float64)) - lg(k + 1) - lg(H - k + 1)
    a_, b_ = a[..., None], b[..., None]
    log_pmf = (log_choose + lg(a_ + k) + lg(b_ + H - k) - lg(a_ + b_ + H)
               - (lg(a_) + lg(b_) - lg(a_ + b_)))
    pmf = log_pmf.exp()
    pmf = pmf / pmf.sum(-1, keepdim=True)
    atoms = (a_ + k) / (alpha.sum() + n + H)
    return atoms, pmf


# ----------------------------------------------------------------------------- distances
def wasserstein1(samples: Tensor, atoms: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Wasserstein-1 distance on the real line, row by row: ``integral |F_1 - F_2|``.

    ``samples: [..., S]`` is an empirical law (equal weights).  The second law is ``atoms:
    [..., M]`` with probabilities ``weights: [..., M]`` (default equal weights: another sample).
    Both CDFs are step functions, so the integral is computed exactly over the merged break
    points.  Returns ``[...]`` float64.
    """
    if atoms is None:
        raise ValueError("wasserstein1 needs the second law: atoms (and optionally weights)")
    s = samples.double().sort(-1).values
    z_atoms = atoms.double()
    if weights is None:
        weights = torch.full_like(z_atoms, 1.0 / z_atoms.shape[-1])
    order = z_atoms.argsort(-1)
    a = z_atoms.gather(-1, order)
    w = weights.double().gather(-1, order)
    cdf_a = w.cumsum(-1)
    cdf_a = cdf_a / cdf_a[..., -1:]
    z = torch.cat([s, a], -1).sort(-1).values  # (..., S + M) break points
    S = s.shape[-1]
    f1 = torch.searchsorted(s.contiguous(), z.contiguous(), right=True).double() / S
    idx = torch.searchsorted(a.contiguous(), z.contiguous(), right=True)  # atoms <= z
    f2 = torch.where(idx > 0, cdf_a.gather(-1, (idx - 1).clamp_min(0)), torch.zeros_like(z))
    gaps = z[..., 1:] - z[..., :-1]
    return ((f1 - f2)[..., :-1].abs() * gaps).sum(-1)


def expected_w1_floor(atoms: Tensor, pmf: Tensor, num_samples: int) -> Tensor:
    """The expected Wasserstein-1 distance between ``S`` i.i.d. draws from a discrete law and the
    law itself (the Monte Carlo floor of a perfect sampler): ``sum_k gap_k E|F_S - F|(x_k)``
    with ``S F_S(x_k) ~ Binomial(S, F(x_k))``, computed exactly (de Moivre's mean absolute
    deviation).  ``[...]`` float64 for ``atoms, pmf: [..., M]`` sorted by atom."""
    F = pmf.double().cumsum(-1)[..., :-1].clamp(0, 1)  # (..., M-1)
    gaps = atoms.double()[..., 1:] - atoms.double()[..., :-1]
    S = int(num_samples)
    # E|X - S F| for X ~ Bin(S, F) = 2 m C(S, m) F^m (1-F)^(S-m+1) * ... (de Moivre):
    # MAD = 2 (m) C(S, m) F^m (1 - F)^(S - m + 1) with m = floor(S F) + 1.
    m = torch.floor(S * F) + 1
    lg = torch.lgamma
    Fc = F.clamp(1e-300, 1 - 1e-16)
    log_mad = (math.log(2) + torch.log(m) + lg(torch.tensor(S + 1.0, dtype=torch.float64)) - lg(m + 1)
               - lg(S - m + 1) + m * Fc.log() + (S - m + 1) * torch.log1p(-Fc))
    mad = torch.where((F > 0) & (F < 1) & (m <= S), log_mad.exp(), torch.zeros_like(F))
    return (mad / S * gaps).sum(-1)


def central_interval(values: Tensor, level: float, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Central ``level`` interval of each row's law, by the inverse CDF
    (``Q(a) = min{x : F(x) >= a}``) at ``(1 - level)/2`` and ``(1 + level)/2``.

    ``values: [..., M]`` (samples, or atoms with ``weights: [..., M]``) -> ``(lo, hi)``: ``[...]``.
    The same definition serves draws and the exact discrete law, so a perfect sampler's
    intervals converge to the exact ones."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    order = values.argsort(-1)
    x = values.double().gather(-1, order)
    w = torch.ones_like(x) if weights is None else weights.double().gather(-1, order)
    cdf = w.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    out = []
    for a in ((1 - level) / 2, (1 + level) / 2):
        target = torch.full_like(cdf[..., :1], a - 1e-12)  # tolerate rounding at exact levels
        i = torch.searchsorted(cdf.contiguous(), target, right=False).clamp_(max=x.shape[-1] - 1)
        out.append(x.gather(-1, i)[..., 0])
    return out[0], out[1]


def coverage(lo: Tensor, hi: Tensor, theta: Tensor) -> Tensor:
    """Fraction of rows with ``lo <= theta <= hi`` (``[...]`` each) -> scalar float64."""
    return ((lo <= theta) & (theta <= hi)).double().mean()


# ----------------------------------------------------------------------------- comparison
@dataclass
class PosteriorComparison:
    """Predictive resampling of one predictor against the exact law of ``p_{n+H}``.

    Tensors: ``draws [S, B, V]`` (the predictor's ``p_{n+H}``), ``atoms, pmf [B, V, M]`` (the
    reference law: exact Polya urn, or ``M`` equally weighted draws of the exact predictor),
    ``theta [B, V]`` (the latent parameter each context was drawn from), ``w1 [B, V]``.
    ``coverage``: ``{level: (predictor, reference)}`` over contexts and coordinates.
    """

    task: str
    n: int
    horizon: int
    num_samples: int
    exact: bool  # the reference law is the closed form (True) or the resampled exact predictor
    context: Tensor
    theta: Tensor
    draws: Tensor
    atoms: Tensor
    pmf: Tensor
    w1: Tensor
    w1_floor: Tensor | None
    coverage: dict = field(default_factory=dict)
    coordinates: list = field(default_factory=list)  # the coordinates reported

    def summary(self) -> dict[str, float]:
        """Flat numbers: mean / max over coordinates of the mean W1 over contexts, the Monte
        Carlo floor, and ``coverage{L}`` beside ``coverage{L}_exact`` (in [0, 1])."""
        per_coord = self.w1[:, self.coordinates].mean(0)  # (V',)
        out = {"w1": float(per_coord.mean()), "w1_max_coord": float(per_coord.max())}
        if self.w1_floor is not None:
            out["w1_floor"] = float(self.w1_floor[:, self.coordinates].mean())
        for level, (model, ref) in self.coverage.items():
            key = f"coverage{int(round(level * 100))}"
            out[key], out[f"{key}_exact"] = float(model), float(ref)
        return out

    def table(self, name: str = "model") -> str:
        s = self.summary()
        ref = "exact Polya urn" if self.exact else "exact predictor, resampled"
        head = (f"{self.task}: n={self.n}, H={self.horizon}, S={self.num_samples}, "
                f"{self.theta.shape[0]} contexts; reference: {ref}")
        cols = ["W1 (mean coord)", "W1 (max coord)"] + [f"cover {int(lv * 100)}%" for lv in self.coverage]
        vals = [f"{s['w1']:.4f}", f"{s['w1_max_coord']:.4f}"]
        vals += [f"{s[f'coverage{int(round(lv * 100))}']:.3f}" for lv in self.coverage]
        exact_vals = ["0 (floor {:.4f})".format(s["w1_floor"]) if "w1_floor" in s else "0", "0"]
        exact_vals += [f"{s[f'coverage{int(round(lv * 100))}_exact']:.3f}" for lv in self.coverage]
        width = max(len(name), len("exact law"))
        lines = [head, " | ".join([" " * width] + cols)]
        lines.append(" | ".join([name.ljust(width)] + [v.rjust(len(c)) for v, c in zip(vals, cols)]))
        lines.append(" | ".join(["exact law".ljust(width)] + [v.rjust(len(c)) for v, c in zip(exact_vals, cols)]))
        return "\n".join(lines)


def compare_posterior(
    predictor,
    task,
    n: int = 8,
    horizon: int = 16,
    num_samples: int = 1000,
    num_contexts: int = 128,
    generator: torch.Generator | None = None,
    levels=LEVELS,
    context: Tensor | None = None,
    theta: Tensor | None = None,
    reference_samples: int | None = None,
    device=None,
    **resample_kw,
) -> PosteriorComparison:
    """Draw ``num_contexts`` contexts of length ``n`` from ``task`` (with their latent
    ``theta``), resample ``predictor`` ``horizon`` steps ``num_samples`` times from each, and
    compare with the exact law of ``p_{n+H}``: the closed-form Polya urn for ``Dirichlet`` /
    ``Coin``; otherwise the task's exact Bayes predictor resampled with ``reference_samples``
    rolls (default ``4 * num_samples``).  Pass ``context`` and ``theta`` to use given ones.
    For ``Coin`` only the success coordinate is reported (the other is its mirror image)."""
    from bayestrain.tasks import BayesPredictor, Coin, Dirichlet, Markov

    if isinstance(task, Markov):
        raise ValueError("predictive resampling compares laws of the i.i.d. parameter theta; Markov's "
                         "theta is a transition matrix, so it is not supported (use coin, dirichlet, mixture)")
    if device is None:
        p = next(iter(predictor.parameters()), None) if hasattr(predictor, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    if context is None:
        g = generator if generator is None or generator.device.type == "cpu" else None
        context, theta = task.sample(num_contexts, n, g, return_params=True)
    elif theta is None:
        raise ValueError("compare_posterior: pass theta (the latent parameter of each context) with context")
    context, theta = context.to(device), theta.to(device=device, dtype=torch.float64)
    n = context.shape[1]
    draws = predictive_resample(predictor, context, horizon, num_samples, generator, **resample_kw)
    exact = isinstance(task, Dirichlet)
    if exact:
        atoms, pmf = polya_urn_law(dirichlet_alpha(task).to(device), context, horizon)
        floor = expected_w1_floor(atoms, pmf, num_samples)
    else:
        m = reference_samples or 4 * num_samples
        ref = predictive_resample(BayesPredictor(task), context, horizon, m, generator)  # (M, B, V)
        atoms, pmf = ref.permute(1, 2, 0).contiguous(), None
        floor = None
    samples = draws.permute(1, 2, 0)  # (B, V, S)
    w1 = wasserstein1(samples, atoms, pmf)
    coords = [1] if isinstance(task, Coin) else list(range(task.vocab_size))
    cov = {}
    for level in levels:
        lo, hi = central_interval(samples, level)
        elo, ehi = central_interval(atoms, level, pmf)
        th = theta[:, coords]
        cov[float(level)] = (coverage(lo[:, coords], hi[:, coords], th),
                             coverage(elo[:, coords], ehi[:, coords], th))
    if pmf is None:
        pmf = torch.full_like(atoms, 1.0 / atoms.shape[-1])
    return PosteriorComparison(
        task=type(task).__name__, n=n, horizon=horizon, num_samples=num_samples, exact=exact,
        context=context.cpu(), theta=theta.cpu(), draws=draws.cpu(), atoms=atoms.cpu(), pmf=pmf.cpu(),
        w1=w1.cpu(), w1_floor=None if floor is None else floor.cpu(), coverage=cov, coordinates=coords,
    )


# ----------------------------------------------------------------------------- plot
def posterior_figure(comparison: PosteriorComparison, contexts=(0, 1, 2), coordinate: int | None = None,
                     bins: int | None = None, title: str | None = None):
    """The predictor's resampled law of ``p_{n+H, v}`` (histogram of its draws) against the exact
    law (stems at the Polya-urn atoms), one panel per context, with the true ``theta_v`` and
    both central 90% intervals.  A pure function: returns a ``matplotlib.figure.Figure`` with an
    Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = comparison
    v = coordinate if coordinate is not None else c.coordinates[0]
    idx = [i for i in contexts if i < c.theta.shape[0]] or [0]
    fig = Figure(figsize=(4.2 * len(idx) + 1.6, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(idx), squeeze=False)[0]
    for ax, b in zip(axes, idx):
        draws = c.draws[:, b, v].numpy()
        atoms, pmf = c.atoms[b, v].numpy(), c.pmf[b, v].numpy()
        if c.exact:
            spacing = float(np.min(np.diff(atoms))) if atoms.size > 1 else 1.0
            edges = np.concatenate([atoms - spacing / 2, atoms[-1:] + spacing / 2])
            ax.hist(draws, bins=edges, density=False, weights=np.full(draws.shape, 1.0 / draws.size),
                    color="tab:blue", alpha=0.55, label=f"predictor ({draws.size} rolls)")
            ax.vlines(atoms, 0, pmf, color="k", linewidth=1.2)
            ax.plot(atoms, pmf, "o", color="k", markersize=3, label="exact law (Polya urn)")
            ax.set_ylabel("probability")
        else:
            nb = bins or 30
            lo, hi = float(min(draws.min(), atoms.min())), float(max(draws.max(), atoms.max()))
            edges = np.linspace(lo, hi + 1e-9, nb + 1)
            ax.hist(draws, bins=edges, density=True, color="tab:blue", alpha=0.55, label="predictor")
            ax.hist(atoms, bins=edges, density=True, histtype="step", color="k", linewidth=1.4,
                    label="exact predictor, resampled")
            ax.set_ylabel("density")
        theta = float(c.theta[b, v])
        ax.axvline(theta, color="tab:red", linestyle="--", linewidth=1.2, label=f"true theta = {theta:.3f}")
        lo, hi = central_interval(c.draws[:, b, v], 0.9)
        elo, ehi = central_interval(c.atoms[b, v], 0.9, c.pmf[b, v])
        top = ax.get_ylim()[1] * 1.3  # headroom for the interval bars
        ax.set_ylim(0, top)
        ax.hlines([0.95 * top], float(lo), float(hi), color="tab:blue", linewidth=3, label="predictor 90%")
        ax.hlines([0.88 * top], float(elo), float(ehi), color="k", linewidth=3, label="exact 90%")
        ax.set_xlabel(f"p_(n+H), coordinate {v}")
        ax.set_title(f"context {b}: W1 = {float(c.w1[b, v]):.4f}", fontsize="medium")
        ax.set_xlim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [lb if not lb.startswith("true theta") else "true theta" for lb in labels]
    fig.legend(handles, labels, loc="outside right upper", fontsize="x-small")
    fig.suptitle(title or f"{c.task}: law of p_(n+H), n={c.n}, H={c.horizon}")
    return fig
