"""BayesTransformer: a predictor in every layout (normalised, causal), branches that equal a
naive recompute, attention read-outs, and clear refusals."""
import pytest
import torch

from bayestrain.model import BayesTransformer

V = 5
CONFIGS = [
    dict(layout="causal", pos_encoding="learned"),
    dict(layout="causal", pos_encoding="rope"),
    dict(layout="causal", pos_encoding="none", norm="rmsnorm", residual="convex"),
    dict(layout="causal", pos_encoding="rope", tied_qk=True),
    dict(layout="set", pos_encoding="none"),
    dict(layout="set", pos_encoding="none", attention="sinkhorn", n_iters=4),
    dict(layout="bidirectional", pos_encoding="learned", attention="sinkhorn"),
    dict(layout="bidirectional", pos_encoding="rope", tied_qk=True),
]


def make(**kw):
    torch.manual_seed(1)
    return BayesTransformer(V, d_model=32, n_layers=2, n_heads=4, max_len=32, **kw).double().eval()


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_predictor_is_normalised_and_causal(kw):
    m = make(**kw)
    x = torch.randint(0, V, (3, 9))
    logp = m(x)
    assert logp.shape == (3, 9, V) and logp.dtype == torch.float64
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 9, dtype=torch.float64))
    for t in (0, 4, 8):
        x2 = x.clone()
        x2[:, t:] = (x2[:, t:] + 1 + torch.randint(0, V - 1, x2[:, t:].shape)) % V  # every later token changes
        logp2 = m(x2)
        assert (logp2[:, : t + 1] - logp[:, : t + 1]).abs().max() < 1e-12, "logp[:, :t+1] saw x[:, t:]"
        if t < 8:
            assert (logp2[:, t + 1 :] - logp[:, t + 1 :]).abs().max() > 1e-6, "the future should matter"


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_branch_logp_equals_naive_recompute(kw):
    m = make(**kw)
    x = torch.randint(0, V, (2, 8))
    y = torch.arange(V)
    for t in (0, 3, 7):
        fast = m.branch_logp(x, t, y)  # (B, V_y, V)
        naive = torch.stack([m(torch.cat([x[:, :t], yy.expand(2, 1), x[:, :1]], 1))[:, t + 1] for yy in y], 1)
        torch.testing.assert_close(fast, naive, atol=1e-12, rtol=0)


def test_branch_reuses_the_main_pass_cache():
    m = make(layout="causal", pos_encoding="rope")
    x = torch.randint(0, V, (3, 10))
    out = m.run(x, return_cache=True)
    pos = torch.tensor([0, 4, 8])
    y = torch.randint(0, V, (3, 3, 6))
    torch.testing.assert_close(m.branch_logp_many(x, pos, y, cache=out.cache), m.branch_logp_many(x, pos, y))


@pytest.mark.parametrize("kw", [CONFIGS[0], CONFIGS[5]], ids=["causal", "set-sinkhorn"])
def test_attention_readouts(kw):
    m = make(**kw)
    x = torch.randint(0, V, (2, 6))
    logp_w, weights = m(x, return_attn="weights")
    logp_m, marg = m(x, return_attn="marginals")
    torch.testing.assert_close(logp_w, m(x))
    assert len(weights) == len(marg) == 2
    rho = weights.log_rho.exp()  # (B', Q)
    for w, mu in zip(weights, marg):
        valid_rows = w.sum(-1) > 0
        torch.testing.assert_close(w.sum(-1)[valid_rows], torch.ones_like(w.sum(-1)[valid_rows]))
        torch.testing.assert_close(mu, (rho[:, None, :, None] * w).sum(-2))
        torch.testing.assert_close(mu.sum(-1), torch.ones_like(mu.sum(-1)))


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="sinkhorn.*causal"):
        BayesTransformer(V, layout="causal", attention="sinkhorn")
    with pytest.raises(ValueError, match="pos_encoding"):
        BayesTransformer(V, layout="set", pos_encoding="learned")
    with pytest.raises(ValueError, match="layout='diagonal'"):
        BayesTransformer(V, layout="diagonal")
    with pytest.raises(ValueError, match="max_len"):
        BayesTransformer(V, max_len=8)(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="return_attn"):
        BayesTransformer(V)(torch.zeros(1, 4, dtype=torch.long), return_attn="scores")
