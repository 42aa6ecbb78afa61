"""Sequence-level conditions: exactly zero for the closed-form Bayes predictors, clearly
positive for non-Bayesian ones, an unbiased sampled estimate, finite gradients, refusals."""
import math

import pytest
import torch

from bayestrain.conditions import (
    ConditionInput,
    Exchangeability,
    Martingale,
    exchangeability_violation,
    martingale_violation,
)
from bayestrain.model import BayesTransformer
from bayestrain.tasks import BayesPredictor, Coin, Dirichlet, Markov, Mixture

EXCHANGEABLE = [Coin(2.0, 0.5), Dirichlet(6, 0.7), Dirichlet(4, [0.5, 1.0, 2.0, 3.0]), Mixture(5, [0.3, 0.7], [0.2, 5.0])]


class CountPredictor(torch.nn.Module):
    """Predicts from (discounted) counts: ``p_t(v) ∝ a_t + sum_{s<t} gamma^(t-1-s) [x_s = v]``.
    gamma=1 and a_t constant is the Dirichlet posterior predictive (Bayes); gamma<1 is
    order-dependent; gamma=1 with a_t growing in t depends on the prefix only through its
    counts yet is not exchangeable."""

    def __init__(self, V, gamma=1.0, alpha=1.0, alpha_slope=0.0):
        super().__init__()
        self.V = V
        self.log_alpha = torch.nn.Parameter(torch.tensor(math.log(alpha), dtype=torch.float64))
        self.gamma, self.slope = gamma, alpha_slope

    def forward(self, x):
        B, T = x.shape
        onehot = torch.nn.functional.one_hot(x, self.V).double()  # (B, T, V)
        t = torch.arange(T, dtype=torch.float64)
        # weight of x_s in the predictive at t: gamma^(t-1-s) for s < t
        w = torch.where(t[:, None] > t[None, :], self.gamma ** (t[:, None] - 1 - t[None, :]).clamp_min(0), 0.0)
        counts = torch.einsum("ts,bsv->btv", w, onehot)
        a = self.log_alpha.exp() * (1 + self.slope * t)[None, :, None]
        return torch.log((a + counts) / (a + counts).sum(-1, keepdim=True))


@pytest.mark.parametrize("task", EXCHANGEABLE, ids=repr)
def test_exact_bayes_predictors_have_zero_violations(task):
    g = torch.Generator().manual_seed(0)
    x = task.sample(16, 12, g)
    pred = BayesPredictor(task)
    ex = exchangeability_violation(pred, x, num_permutations=5, generator=g)
    assert ex.value.dtype == torch.float64
    assert ex.value < 1e-9 and ex.violation < 1e-9
    for kind in ("kl", "l2"):
        mg = martingale_violation(pred, x, kind=kind)
        assert abs(mg.value) < 1e-9, (kind, mg.value)


def test_dirichlet_count_predictor_is_bayes_and_matches_task():
    task = Dirichlet(4, 1.0)
    x = task.sample(8, 10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(CountPredictor(4)(x), task.log_posterior_predictive(x))


@pytest.mark.parametrize(
    "pred", [CountPredictor(4, gamma=0.6), CountPredictor(4, alpha_slope=0.5)], ids=["forgetting", "t-smoothing"]
)
def test_non_bayesian_predictors_violate(pred):
    x = Dirichlet(4, 1.0).sample(64, 12, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    ex = exchangeability_violation(pred, x, num_permutations=4, generator=g)
    kl = martingale_violation(pred, x, kind="kl")
    l2 = martingale_violation(pred, x, kind="l2")
    # "clearly positive": orders of magnitude above the exact predictors' 1e-9
    assert kl.value > 1e-4 and l2.value > 1e-5 and ex.value > 1e-3, (kl.value, l2.value, ex.value)


def test_sampled_l2_is_unbiased_in_value_and_gradient():
    torch.manual_seed(0)
    model = BayesTransformer(3, d_model=16, n_layers=1, n_heads=2, max_len=16).double()
    x = Dirichlet(3, 1.0).sample(2, 5, torch.Generator().manual_seed(0))
    pos = torch.tensor([1, 3])
    exact = martingale_violation(model, x, positions=pos, kind="l2")
    (g_exact,) = torch.autograd.grad(exact.violation, [model.head.weight])

    N = 4000  # independent estimates, one per repeated sequence
    xr = x.repeat(N, 1)
    est = martingale_violation(model, xr, positions=pos, kind="l2", num_samples=2,
                               generator=torch.Generator().manual_seed(5))
    (g_est,) = torch.autograd.grad(est.violation, [model.head.weight])
    # Monte Carlo standard error of the mean, from the per-sequence estimates
    per = _per_sequence_l2(model, xr, pos)
    se = per.std() / math.sqrt(N)
    assert abs(est.value - exact.value) < 4 * se + 1e-12, (est.value, exact.value, se)
    rel = (g_est - g_exact).norm() / g_exact.norm()
    assert rel < 0.1, rel


def _per_sequence_l2(model, xr, pos):
    vals = []
    for chunk in xr.split(500):
        st = martingale_violation(model, chunk, positions=pos, kind="l2", num_samples=2,
                                  generator=torch.Generator().manual_seed(len(vals)))
        vals.append(st.value.expand(chunk.shape[0]))
    return torch.cat(vals)


def test_sampled_l2_is_signed_not_clamped():
    task = Dirichlet(4, 1.0)
    pred = BayesPredictor(task)  # exact martingale: the estimate fluctuates around zero
    x = task.sample(64, 6, torch.Generator().manual_seed(0))
    vals = torch.stack([
        martingale_violation(pred, x[i : i + 1], positions=[2], kind="l2", num_samples=1,
                             generator=torch.Generator().manual_seed(i)).value
        for i in range(64)
    ])
    assert (vals < 0).any() and (vals > 0).any()
    assert abs(vals.mean()) < 3 * vals.std() / 8


def test_penalties_have_finite_gradients_where_probabilities_underflow():
    torch.manual_seed(0)
    model = BayesTransformer(6, d_model=16, n_layers=1, n_heads=2, max_len=16)
    with torch.no_grad():
        model.head.weight.mul_(3000.0)  # logits ~1e3: most probabilities underflow to 0
    x = torch.randint(0, 6, (4, 8))
    logp = model(x)
    assert (logp.exp() == 0).any()
    for st in [
        exchangeability_violation(model, x, logp=logp),
        martingale_violation(model, x, kind="kl", logp=logp),
        martingale_violation(model, x, kind="l2", logp=logp),
        martingale_violation(model, x, kind="l2", num_samples=3, logp=logp),
    ]:
        grads = torch.autograd.grad(st.violation, list(model.parameters()), retain_graph=True, allow_unused=True)
        assert torch.isfinite(st.violation)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_training_subset_and_positions_use_the_main_pass():
    torch.manual_seed(0)
    model = BayesTransformer(4, d_model=16, n_layers=1, n_heads=2, max_len=32).double()
    x = torch.randint(0, 4, (8, 10))
    out = model.run(x, return_cache=True)
    cond = Martingale(train_subset=3, train_positions=2)
    g = torch.Generator().manual_seed(0)
    st = cond.violation(ConditionInput(model, x, logp=out.logp, cache=out.cache, generator=g), training=True)
    # the same positions, recomputed from scratch on the same subset
    pos = torch.rand(9, generator=torch.Generator().manual_seed(0)).argsort()[:2].sort().values
    ref = martingale_violation(model, x[:3], positions=pos, kind="kl")
    torch.testing.assert_close(st.value, ref.value)
    full = cond.violation(ConditionInput(model, x, generator=g), training=False)
    torch.testing.assert_close(full.value, martingale_violation(model, x).value)


@pytest.mark.parametrize("cls", [Exchangeability, Martingale])
def test_sequence_conditions_refuse_markov(cls):
    with pytest.raises(ValueError, match="exchangeable"):
        cls().check(None, Markov(3))
    cls().check(None, Dirichlet(3))  # fine


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode='punish'"):
        Martingale(mode="punish")
    with pytest.raises(ValueError, match="num_samples"):
        Martingale(kind="kl", num_samples=4)
    with pytest.raises(ValueError, match="unit_length"):
        exchangeability_violation(CountPredictor(3), torch.zeros(2, 7, dtype=torch.long), unit_length=2)
