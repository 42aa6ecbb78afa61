"""Block-level conditions (DESIGN.md 2.2): Sinkhorn attention (torch backend, float64), prior
consistency and reversibility against independent float64 computations, exact zeros where the
theory says so, the tied W_Q = W_K projection, and refusals."""
import math

import numpy as np
import pytest
import torch

from bayestrain.attention import sinkhorn_attention
from bayestrain.conditions import (
    ConditionInput,
    PriorConsistency,
    Reversibility,
    prior_consistency_violation,
    reversibility_violation,
    stationary_law,
    tie_fused_qkv_,
    tie_qk_,
)
from bayestrain.model import BayesTransformer

F64 = torch.float64


def rand(*shape, g=None):
    return torch.randn(*shape, dtype=F64, generator=g)


# ============================================================================ Sinkhorn attention
def test_sinkhorn_zero_iterations_is_softmax():
    B, H, N, D = 2, 3, 13, 8
    q, k, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    out = sinkhorn_attention(q, k, v, n_iters=0, backend="torch")
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("n_iters", [0, 3])
def test_sinkhorn_rows_sum_to_one_and_padded_rows_are_zero(n_iters):
    B, H, N, D = 2, 2, 13, 4
    q, k, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -4:] = True
    out, w = sinkhorn_attention(q, k, v, key_padding_mask=pad, n_iters=n_iters, backend="torch", return_weights=True)
    sums = w.sum(-1)  # (B, H, N)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]), atol=1e-13, rtol=0)
    torch.testing.assert_close(sums[1, :, :-4], torch.ones_like(sums[1, :, :-4]), atol=1e-13, rtol=0)
    assert (w[1, :, -4:] == 0).all() and (w[1, :, :, -4:] == 0).all()
    assert (out[1, :, -4:] == 0).all()


def _log_probs(shape, visible, g):
    """Random positive law over the visible entries (last axis), as log-probabilities (-inf off)."""
    x = rand(*shape, g=g).mul(1.5).masked_fill(~visible, -math.inf)
    return torch.log_softmax(x, -1)


ITERS = [1, 2, 4, 8, 16, 20]


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("N", [13, 37])
@pytest.mark.parametrize("prior_kind", ["uniform", "K", "BK", "BHK"])
def test_sinkhorn_residual_decreases_geometrically(prior_kind, N, padded):
    g = torch.Generator().manual_seed(N * 10 + padded)
    B, H, D = 2, 3, 8
    q, k, v = rand(B, H, N, D, g=g), rand(B, H, N, D, g=g), rand(B, H, N, D, g=g)
    q = 1.5 * q  # a non-trivial softmax marginal
    pad = torch.zeros(B, N, dtype=torch.bool)
    if padded:
        pad[1, -5:] = True
    valid = ~pad
    log_rho = _log_probs((B, N), valid, g)  # non-uniform query weights
    if prior_kind == "uniform":
        log_pi = None
    elif prior_kind == "K":  # one [K] prior: it must vanish on every sequence's padding
        log_pi = _log_probs((N,), valid.all(0), g)
    elif prior_kind == "BK":
        log_pi = _log_probs((B, N), valid, g)
    else:
        log_pi = _log_probs((B, H, N), valid[:, None], g)
    res = []
    for n in ITERS:
        out, r = sinkhorn_attention(q, k, v, log_prior=log_pi, log_query_weights=log_rho, key_padding_mask=pad,
                                    n_iters=n, backend="torch", return_residual=True)
        assert torch.isfinite(out).all() and torch.isfinite(r).all()
        if padded:
            assert (out[1, :, -5:] == 0).all()
        res.append(r)
    r = torch.stack(res)  # (iters, B, H)
    assert (r > -1e-14).all(), f"KL(pi || mu) must be >= 0, got {r.min().item():.3g}"
    mono = r[:-1] - r[1:]  # over 1, 2, 4, 8, 16, 20
    assert (mono > -1e-14).all(), f"residual increased: {mono.min().item():.3g}"
    assert (r[0] > 1e-6).all()  # not trivially converged
    assert (r[-1] < 1e-3 * r[0]).all(), (r[-1] / r[0]).max()


def test_sinkhorn_set_targets_do_not_influence_the_context():
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 9, 5
    ctx = torch.arange(N) < N - 1  # the last position is a target query
    allowed = (ctx[:, None] | ~ctx[:, None]) & ctx[None, :]  # every row sees the context only
    log_rho = torch.where(ctx, -math.log(N - 1), -math.inf).expand(B, N)
    q, k, v = rand(B, H, N, D, g=g), rand(B, H, N, D, g=g), rand(B, H, N, D, g=g)
    q2 = q.clone()
    q2[..., -1, :] += 5 * rand(B, H, D, g=g)
    kw = dict(log_query_weights=log_rho, attn_mask=allowed, n_iters=5, backend="torch", return_residual=True)
    out1, r1 = sinkhorn_attention(q, k, v, **kw)
    out2, r2 = sinkhorn_attention(q2, k, v, **kw)
    assert (out1[..., :-1, :] - out2[..., :-1, :]).abs().max() <= 1e-15
    assert (r1 - r2).abs().max() <= 1e-15
    assert (out1[..., -1, :] - out2[..., -1, :]).abs().max() > 1e-3  # the target row itself does move


def test_sinkhorn_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 1, 4, 3
    inputs = (rand(B, H, N, D, g=g), rand(B, H, N, D, g=g), rand(B, H, N, D, g=g),
              torch.log_softmax(rand(B, N, g=g), -1), torch.log_softmax(rand(B, N, g=g), -1))
    inputs = tuple(t.requires_grad_() for t in inputs)

    def f(q, k, v, log_prior, log_rho):
        return sinkhorn_attention(q, k, v, log_prior=log_prior, log_query_weights=log_rho, n_iters=3,
                                  backend="torch", return_residual=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sinkhorn_large_scores_and_fully_masked_rows_and_columns_are_finite():
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 7, 4
    q = (rand(B, H, N, D, g=g) * 70).requires_grad_()
    k = (rand(B, H, N, D, g=g) * 70).requires_grad_()
    v = rand(B, H, N, D, g=g).requires_grad_()
    log_pi = torch.log_softmax(rand(B, N, g=g), -1).requires_grad_()
    allowed = torch.ones(N, N, dtype=torch.bool)
    allowed[2, :] = False  # a query that sees nothing
    allowed[:, 5] = False  # a key nobody sees
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -1] = True
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    assert scores.abs().max() > 3e3 and scores.abs().max() < 2e4
    out, r = sinkhorn_attention(q, k, v, log_prior=log_pi, key_padding_mask=pad, attn_mask=allowed,
                                n_iters=5, backend="torch", return_residual=True)
    assert torch.isfinite(out).all() and torch.isfinite(r).all()
    assert (out[:, :, 2] == 0).all() and (out[1, :, -1] == 0).all()
    (out.sum() + r.sum()).backward()
    for t in (q, k, v, log_pi):
        assert torch.isfinite(t.grad).all()


# ============================================================================ prior consistency
def _kernels(B, H, Q, K, key_mask, g, empty_rows=()):
    """Random row-stochastic kernels [B, H, Q, K] over the visible keys; ``empty_rows``: rows of
    zeros (padding)."""
    s = (2 * rand(B, H, Q, K, g=g)).masked_fill(~key_mask[:, None, None, :], -math.inf)
    a = torch.softmax(s, -1)
    for i in empty_rows:
        a[:, :, i] = 0
    return a


def _ref_prior_consistency(attn, rho, pi):
    """Plain loops: mu_j = sum_i rho_i A_ij, KL(pi || mu), TV; mean over b, h."""
    A, rho, pi = attn.numpy(), rho.numpy(), pi.numpy()
    B, H, Q, K = A.shape
    kl = tv = 0.0
    for b in range(B):
        for h in range(H):
            mu = [sum(rho[b, i] * A[b, h, i, j] for i in range(Q)) for j in range(K)]
            p = pi[b, h]
            kl += sum(p[j] * math.log(p[j] / mu[j]) for j in range(K) if p[j] > 0)
            tv += 0.5 * sum(abs(p[j] - mu[j]) for j in range(K))
    return kl / (B * H), tv / (B * H)


def _setup_pc(g):
    B, H, Q, K = 3, 2, 6, 7
    key_mask = torch.ones(B, K, dtype=torch.bool)
    key_mask[1, -2:] = False
    key_mask[2, 0] = False
    return B, H, Q, K, key_mask


@pytest.mark.parametrize("prior_kind", ["uniform", "K", "BK", "BHK"])
def test_prior_consistency_equals_independent_computation(prior_kind):
    g = torch.Generator().manual_seed(1)
    B, H, Q, K, key_mask = _setup_pc(g)
    layers = [_kernels(B, H, Q, K, key_mask, g, empty_rows=(4,)) for _ in range(2)]
    rho = torch.softmax(rand(B, Q, g=g), -1)
    common = key_mask.all(0)
    if prior_kind == "uniform":
        prior, pi = "uniform", key_mask.double() / key_mask.sum(-1, keepdim=True)
    elif prior_kind == "K":
        prior = torch.softmax(rand(K, g=g).masked_fill(~common, -math.inf), -1)
        pi = prior.expand(B, K)
    elif prior_kind == "BK":
        prior = pi = torch.softmax(rand(B, K, g=g).masked_fill(~key_mask, -math.inf), -1)
    else:
        prior = torch.softmax(rand(B, H, K, g=g).masked_fill(~key_mask[:, None], -math.inf), -1)
        pi = prior
    pi = pi if pi.dim() == 3 else pi[:, None].expand(B, H, K)

    # explicit query weights, from the weights
    st = prior_consistency_violation(layers, prior=prior, query_weights=rho, key_mask=key_mask)
    refs = [_ref_prior_consistency(a, rho, pi) for a in layers]
    ref_kl, ref_tv = np.mean([r[0] for r in refs]), np.mean([r[1] for r in refs])
    assert abs(st.value.item() - ref_kl) < 1e-12 and abs(st.extras["tv"].item() - ref_tv) < 1e-12
    assert st.value > 1e-3  # random kernels are not prior-consistent

    # default query weights: uniform over the rows that carry mass (row 4 is empty)
    st = prior_consistency_violation(layers[0], prior=prior, key_mask=key_mask)
    rho_default = torch.ones(B, Q, dtype=F64)
    rho_default[:, 4] = 0
    rho_default /= rho_default.sum(-1, keepdim=True)
    ref_kl, ref_tv = _ref_prior_consistency(layers[0], rho_default, pi)
    assert abs(st.value.item() - ref_kl) < 1e-12 and abs(st.extras["tv"].item() - ref_tv) < 1e-12

    # from the key marginals alone
    mus = [torch.einsum("bq,bhqk->bhk", rho, a) for a in layers]
    st_m = prior_consistency_violation(key_marginals=mus, prior=prior, key_mask=key_mask)
    st_w = prior_consistency_violation(layers, prior=prior, query_weights=rho, key_mask=key_mask)
    assert abs(st_m.value.item() - st_w.value.item()) < 1e-14
    assert abs(st_m.extras["tv"].item() - st_w.extras["tv"].item()) < 1e-14


def test_causal_uniform_is_the_key_marginal_of_uniform_causal_attention():
    B, H, K = 3, 2, 9
    lengths = [9, 6, 1]
    key_mask = torch.zeros(B, K, dtype=torch.bool)
    attn = torch.zeros(B, H, K, K, dtype=F64)
    for b, n in enumerate(lengths):  # right padding: N visible keys, N rows of uniform causal attention
        key_mask[b, :n] = True
        attn[b, :, :n, :n] = torch.tril(torch.ones(n, n, dtype=F64)) / torch.arange(1, n + 1, dtype=F64)[:, None]
    st = prior_consistency_violation(attn, prior="causal_uniform", key_mask=key_mask)
    assert st.value.abs() < 1e-12 and st.extras["tv"] < 1e-12
    # the formula itself, written out: pi_j = (1/N) sum_{i >= j} 1/(i+1)
    for b, n in enumerate(lengths):
        pi = [sum(1 / (i + 1) for i in range(j, n)) / n for j in range(n)]
        mu = attn[b, 0, :n, :n].mean(0)
        torch.testing.assert_close(mu, torch.tensor(pi, dtype=F64), atol=1e-15, rtol=0)
    # and a uniform prior is not met by it
    assert prior_consistency_violation(attn, prior="uniform", key_mask=key_mask).value > 1e-2


def test_prior_consistency_gradients_are_finite_where_mu_underflows():
    g = torch.Generator().manual_seed(0)
    B, H, Q, K = 2, 2, 5, 6
    s = rand(B, H, Q, K, g=g).requires_grad_()
    shift = torch.zeros(K, dtype=F64)
    shift[3] = -1e4  # key 3: mu underflows to exactly 0
    attn = torch.softmax(s + shift, -1)
    assert (attn[..., 3] == 0).all()
    prior = torch.full((K,), 0.2, dtype=F64)
    prior[3] = 0.0
    st = prior_consistency_violation(attn, prior=prior)
    (grad,) = torch.autograd.grad(st.violation, s)
    assert torch.isfinite(st.violation) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_prior_consistency_refusals():
    g = torch.Generator().manual_seed(0)
    B, H, Q, K = 2, 1, 4, 5
    key_mask = torch.ones(B, K, dtype=torch.bool)
    key_mask[0, -1] = False
    attn = _kernels(B, H, Q, K, key_mask, g)
    with pytest.raises(ValueError, match="outside key_mask"):
        prior_consistency_violation(attn, prior=torch.full((K,), 0.2, dtype=F64), key_mask=key_mask)
    with pytest.raises(ValueError, match="prior"):
        prior_consistency_violation(attn, prior=torch.full((K,), 0.3, dtype=F64))
    with pytest.raises(ValueError, match="prior"):  # log-probabilities are not probabilities
        prior_consistency_violation(attn, prior=torch.full((K,), -math.log(K), dtype=F64))
    with pytest.raises(ValueError, match="prior='flat'"):
        prior_consistency_violation(attn, prior="flat")
    with pytest.raises(ValueError, match="exactly one"):
        prior_consistency_violation(attn, key_marginals=attn.sum(-2))


def _model(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(d_model=16, n_layers=2, n_heads=2, max_len=16)
    return BayesTransformer(5, **{**base, **kw}).double()


def test_condition_refusals_name_the_option():
    causal = _model(layout="causal")
    with pytest.raises(ValueError, match="prior=causal_uniform"):
        PriorConsistency(prior="uniform").check(causal, None)
    PriorConsistency(prior="causal_uniform").check(causal, None)  # fine
    soft = _model(layout="bidirectional")
    with pytest.raises(ValueError, match="model.attention=sinkhorn"):
        PriorConsistency(mode="projection").check(soft, None)
    sink = _model(layout="set", pos_encoding="none", attention="sinkhorn")
    PriorConsistency(mode="projection").check(sink, None)  # fine
    with pytest.raises(ValueError, match="prior=uniform"):
        PriorConsistency(prior="causal_uniform", mode="projection").check(sink, None)
    with pytest.raises(ValueError, match="layout=set.*bidirectional"):
        Reversibility().check(causal, None)
    Reversibility(mode="projection").check(soft, None)  # fine
    with pytest.raises(ValueError, match="prior='flat'"):
        PriorConsistency(prior="flat")


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
        self.layout, self.attention = model.layout, model.attention

    def forward(self, x, return_attn=None):
        self.calls += 1
        return self.model(x, return_attn=return_attn)


def test_prior_consistency_condition_reads_the_trace_or_runs_once():
    model = _model(layout="set", pos_encoding="none")
    x = torch.randint(0, 5, (3, 6))
    cond = PriorConsistency()
    counted = _CountingModel(model)
    _, marg = model(x, return_attn="marginals")
    _, weights = model(x, return_attn="weights")
    st_trace = cond.violation(ConditionInput(counted, x, attn=marg), training=True)
    assert counted.calls == 0
    st_own = cond.violation(ConditionInput(counted, x), training=False)
    assert counted.calls == 1
    st_w = cond.violation(ConditionInput(counted, x, attn=weights), training=True)
    assert counted.calls == 1
    # the weights path uses the trace's query law (the QUERY row has rho = 0), so all agree
    torch.testing.assert_close(st_trace.value, st_own.value, atol=1e-14, rtol=0)
    torch.testing.assert_close(st_w.value, st_trace.value, atol=1e-12, rtol=0)
    ref = prior_consistency_violation(key_marginals=list(marg), prior="uniform", key_mask=marg.key_mask)
    torch.testing.assert_close(st_trace.value, ref.value)
    assert st_trace.value > 1e-4


def test_prior_consistency_projection_mode_logs_the_sinkhorn_residual():
    x = torch.randint(0, 5, (3, 6))
    sink = _model(layout="set", pos_encoding="none", attention="sinkhorn", n_iters=2)
    cond = PriorConsistency(mode="projection")
    _, trace = sink(x, return_attn="marginals")
    st = cond.violation(ConditionInput(sink, x, attn=trace), training=True)
    torch.testing.assert_close(st.value, torch.stack(trace.residuals).mean())
    assert "tv" in st.extras and st.value > 0
    # many iterations: the key marginal is the prior up to the iterations' residual
    converged = _model(layout="set", pos_encoding="none", attention="sinkhorn", n_iters=30)
    softmax = _model(layout="set", pos_encoding="none")
    pen = PriorConsistency(mode="penalty")
    v_sink = pen.violation(ConditionInput(converged, x), training=False).value
    v_soft = pen.violation(ConditionInput(softmax, x), training=False).value
    assert v_sink < 1e-6 < 1e-3 < v_soft, (v_sink, v_soft)


def test_prior_consistency_with_position_weights_matches_the_models_sinkhorn_prior():
    x = torch.randint(0, 5, (3, 6))
    w = [float(2.0 ** -i) + 0.05 for i in range(16)]  # max_len = 16 weights over key positions
    model = _model(layout="set", pos_encoding="none", attention="sinkhorn", n_iters=30, prior=w)
    same = PriorConsistency(prior=w)
    same.check(model, None)
    assert same.violation(ConditionInput(model, x), training=False).value < 1e-6
    assert PriorConsistency(prior="uniform").violation(ConditionInput(model, x), training=False).value > 1e-2
    # projection mode logs the model's own residual, so the priors must agree
    proj = PriorConsistency(prior=w, mode="projection")
    proj.check(model, None)
    _, trace = model(x, return_attn="marginals")
    st = proj.violation(ConditionInput(model, x, attn=trace), training=True)
    torch.testing.assert_close(st.value, torch.stack(trace.residuals).mean())
    with pytest.raises(ValueError, match="model.prior"):
        PriorConsistency(mode="projection").check(model, None)
    with pytest.raises(ValueError, match="max_len"):
        PriorConsistency(prior=w[:8]).check(model, None)


def test_prior_consistency_penalty_trains_a_causal_model():
    model = _model(layout="causal")
    x = torch.randint(0, 5, (4, 8))
    cond = PriorConsistency(prior="causal_uniform")
    cond.check(model, None)
    logp, trace = model(x, return_attn="marginals")
    st = cond.violation(ConditionInput(model, x, logp=logp, attn=trace), training=True)
    grads = torch.autograd.grad(st.violation, [model.blocks[0].attn.q_proj.weight])
    assert st.value > 1e-4 and torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


# ============================================================================ reversibility
def _ref_reversibility(attn, key_mask):
    """numpy: the stationary law by eigen-decomposition of the visible block."""
    A, km = attn.detach().numpy(), key_mask.numpy()
    B, H, N, _ = A.shape
    out = []
    for b in range(B):
        vis = np.flatnonzero(km[b])
        for h in range(H):
            P = A[b, h][np.ix_(vis, vis)]
            P = P / P.sum(1, keepdims=True)
            w, V = np.linalg.eig(P.T)
            pi = np.real(V[:, np.argmin(np.abs(w - 1))])
            pi = pi / pi.sum()
            flow = pi[:, None] * P
            out.append(0.5 * np.abs(flow - flow.T).sum())
    return float(np.mean(out))


def _set_like_kernels(B, H, N, g, key_mask):
    """Random kernels whose visible rows see visible keys only; the invisible rows (targets,
    padding) are arbitrary distributions over every key, which the restriction must ignore."""
    s = 2 * rand(B, H, N, N, g=g)
    vis = key_mask[:, None, :, None] & key_mask[:, None, None, :]
    a = torch.softmax(s.masked_fill(~vis & key_mask[:, None, :, None], -math.inf), -1)
    return a


def test_reversibility_equals_eigen_decomposition():
    g = torch.Generator().manual_seed(2)
    B, H, N = 3, 2, 8
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, -3:] = False
    key_mask[2, [0, 4]] = False
    layers = [_set_like_kernels(B, H, N, g, key_mask) for _ in range(2)]
    st = reversibility_violation(layers, key_mask=key_mask)
    ref = np.mean([_ref_reversibility(a, key_mask) for a in layers])
    assert abs(st.value.item() - ref) < 1e-10 and st.value > 1e-3
    assert 0 <= st.value <= 1
    # the stationary law itself
    pi = stationary_law(layers[0], key_mask)
    mu = torch.einsum("bhi,bhij->bhj", pi, layers[0] * key_mask[:, None, :, None])
    torch.testing.assert_close(mu, pi, atol=1e-12, rtol=0)
    torch.testing.assert_close(pi.sum(-1), torch.ones(B, H, dtype=F64), atol=1e-12, rtol=0)
    assert (pi[1, :, -3:] == 0).all()


def test_reversibility_is_zero_for_symmetric_scores_with_a_key_bias():
    g = torch.Generator().manual_seed(3)
    B, H, N, D = 2, 3, 11, 4
    x = rand(B, H, N, D, g=g)
    W = rand(D, D, g=g)
    S = (x @ (W + W.T) @ x.transpose(-1, -2)) / 2  # symmetric score
    c = 3 * rand(B, H, 1, N, g=g)  # a per-key bias: a_i K_ij b_j
    st = reversibility_violation(torch.softmax(S + c, -1))
    assert st.value < 1e-10
    assert reversibility_violation(torch.softmax(S + rand(B, H, N, N, g=g), -1)).value > 1e-3
    # Sinkhorn with a symmetric score (q = k) and any prior: reversible too
    log_pi = torch.log_softmax(rand(B, N, g=g), -1)
    _, w = sinkhorn_attention(x, x, x, log_prior=log_pi, n_iters=4, backend="torch", return_weights=True)
    assert reversibility_violation(w).value < 1e-10


@pytest.mark.parametrize(
    "kw",
    [dict(layout="bidirectional", pos_encoding="none"), dict(layout="bidirectional", pos_encoding="rope"),
     dict(layout="set", pos_encoding="none", attention="sinkhorn")],
    ids=["bidir-none", "bidir-rope", "set-sinkhorn"],
)
def test_reversibility_of_tied_and_untied_models(kw):
    x = torch.randint(0, 5, (3, 6))
    tied = _model(tied_qk=True, **kw)
    _, trace = tied(x, return_attn="weights")
    assert trace[0].shape[-1] == trace[0].shape[-2] == 7  # [BOS, x_0..x_4, QUERY]
    assert reversibility_violation(list(trace), key_mask=trace.key_mask).value < 1e-10
    cond = Reversibility()
    assert cond.violation(ConditionInput(tied, x), training=False).value < 1e-10
    untied = _model(tied_qk=False, **kw)
    st = cond.violation(ConditionInput(untied, x), training=False)
    assert st.value > 1e-3
    _, trace = untied(x, return_attn="weights")
    torch.testing.assert_close(st.value, reversibility_violation(list(trace), key_mask=trace.key_mask).value)


def test_reversibility_is_differentiable_through_the_solve():
    g = torch.Generator().manual_seed(4)
    S = rand(2, 1, 5, 5, g=g).requires_grad_()
    key_mask = torch.tensor([[True] * 5, [True, True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda s: reversibility_violation(torch.softmax(s, -1), key_mask=key_mask).violation, (S,)
    )


def test_reversibility_of_reducible_kernels_is_finite():
    N = 6
    a = torch.zeros(1, 3, N, N, dtype=F64)
    a[0, 0] = torch.eye(N)  # every state absorbing
    blk = torch.softmax(rand(3, 3), -1)
    a[0, 1, :3, :3], a[0, 1, 3:, 3:] = blk, blk.T.softmax(-1)  # two closed classes
    a[0, 2, :, 0] = 1.0  # everything jumps to state 0
    a.requires_grad_()
    st = reversibility_violation(a)
    (grad,) = torch.autograd.grad(st.violation, a)
    assert torch.isfinite(st.value) and 0 <= st.value <= 1 and torch.isfinite(grad).all()


# ============================================================================ tied projection
def test_tie_is_the_euclidean_projection_and_idempotent():
    g = torch.Generator().manual_seed(5)
    Wq, Wk, bq, bk = rand(8, 8, g=g), rand(8, 8, g=g), rand(8, g=g), rand(8, g=g)
    before = [t.clone() for t in (Wq, Wk, bq, bk)]
    tie_qk_(Wq, Wk, bq, bk)
    assert torch.equal(Wq, Wk) and torch.equal(bq, bk)
    moved = sum((a - b).pow(2).sum() for a, b in zip((Wq, Wk, bq, bk), before))
    gap = ((before[0] - before[1]).pow(2).sum() + (before[2] - before[3]).pow(2).sum()) / 2
    torch.testing.assert_close(moved, gap, atol=1e-12, rtol=1e-12)
    for _ in range(5):  # no other tied point is closer
        Z, z = Wq + 0.1 * rand(8, 8, g=g), bq + 0.1 * rand(8, g=g)
        other = sum((a - b).pow(2).sum() for a, b in zip((Z, Z, z, z), before))
        assert other > moved
    once = [t.clone() for t in (Wq, Wk, bq, bk)]
    tie_qk_(Wq, Wk, bq, bk)
    assert all(torch.equal(a, b) for a, b in zip((Wq, Wk, bq, bk), once))


@pytest.mark.parametrize("kw", [dict(pos_encoding="learned"), dict(pos_encoding="rope")], ids=["learned", "rope"])
def test_projection_keeps_parameters_and_makes_the_model_reversible(kw):
    model = _model(layout="bidirectional", **kw)
    x = torch.randint(0, 5, (3, 6))
    cond = Reversibility(mode="projection")
    cond.check(model, None)
    assert cond.violation(ConditionInput(model, x), training=False).value > 1e-3
    params = list(model.parameters())
    ids = [id(p) for p in params]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).mean().backward()
    opt.step()
    cond.project_(model)
    assert [id(p) for p in model.parameters()] == ids
    assert all(p in opt.state for p in params) and opt.param_groups[0]["params"] == params
    for blk in model.blocks:
        assert torch.equal(blk.attn.q_proj.weight, blk.attn.k_proj.weight)
        assert torch.equal(blk.attn.q_proj.bias, blk.attn.k_proj.bias)
    assert cond.violation(ConditionInput(model, x), training=False).value < 1e-10
    snapshot = [p.detach().clone() for p in params]
    cond.project_(model)  # idempotent
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot))
    opt.zero_grad()
    model(x).mean().backward()
    opt.step()  # the optimizer keeps working on the same objects
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, model.blocks[0].attn.k_proj.weight)


def _fused_attention(x, weight, bias, n_embd, n_heads, layout):
    """Attention weights of a fused qkv layer, built from slices: [B, H, L, L]."""
    qkv = x @ weight.T + bias if layout == "rows" else x @ weight + bias
    q, k, v = qkv.split(n_embd, -1)
    B, L, _ = x.shape
    hd = n_embd // n_heads
    q, k = (t.view(B, L, n_heads, hd).transpose(1, 2) for t in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1), v


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_tie_fused_qkv(layout):
    g = torch.Generator().manual_seed(6)
    n, heads = 12, 3
    if layout == "rows":
        lin = torch.nn.Linear(n, 3 * n).double()
        weight, bias = lin.weight, lin.bias
    else:  # Hugging Face Conv1D: weight [in, 3n]
        weight = torch.nn.Parameter(rand(n, 3 * n, g=g) * 0.5)
        bias = torch.nn.Parameter(rand(3 * n, g=g) * 0.5)
    with torch.no_grad():
        weight.mul_(3)
    x = rand(2, 7, n, g=g)
    a, v_before = _fused_attention(x, weight, bias, n, heads, layout)
    assert reversibility_violation(a).value > 1e-3
    wid, bid = id(weight), id(bias)
    v_w = (weight[2 * n :] if layout == "rows" else weight[:, 2 * n :]).detach().clone()
    tie_fused_qkv_(weight, bias, n_embd=n, layout=layout)
    assert id(weight) == wid and id(bias) == bid
    a, v_after = _fused_attention(x, weight, bias, n, heads, layout)
    assert reversibility_violation(a).value < 1e-10
    torch.testing.assert_close(v_after, v_before, atol=0, rtol=0)  # v untouched
    assert torch.equal(weight[2 * n :] if layout == "rows" else weight[:, 2 * n :], v_w)
    with pytest.raises(ValueError, match="3 \\* n_embd"):
        tie_fused_qkv_(weight, bias, n_embd=n + 1, layout=layout)
