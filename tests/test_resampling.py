"""Posterior by predictive resampling: the exact Polya-urn law, Wasserstein-1, coverage; the
exact Bayes predictor reproduces the law, an order-dependent predictor does not; the cached and
plain rolls agree; bayestrain-eval's posterior and the fidelity report end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bayestrain.resampling import (
    central_interval,
    compare_posterior,
    dirichlet_alpha,
    expected_w1_floor,
    polya_urn_law,
    posterior_figure,
    predictive_resample,
    wasserstein1,
)
from bayestrain.tasks import BayesPredictor, Coin, Dirichlet, Markov, Mixture


class Recency(nn.Module):
    """An order-dependent predictor: Dirichlet predictive from exponentially discounted counts
    (observation ``j`` weighs ``decay^(t - 1 - j)`` at row ``t``): recent data count more."""

    def __init__(self, alpha: torch.Tensor, decay: float = 0.8):
        super().__init__()
        self.alpha, self.decay = alpha, decay

    def forward(self, x):
        T = x.shape[1]
        t = torch.arange(T, dtype=torch.float64)
        w = (self.decay ** (t[:, None] - t[None, :] - 1)).tril(-1)  # (T, T): row t, observation j < t
        c = torch.einsum("tj,bjv->btv", w, nn.functional.one_hot(x, self.alpha.shape[0]).double())
        return ((self.alpha + c) / (self.alpha.sum() + c.sum(-1, keepdim=True))).log()


class StopsUpdating(nn.Module):
    """An order-dependent predictor: the Dirichlet predictive of the first ``k`` observations only."""

    def __init__(self, alpha: torch.Tensor, k: int = 4):
        super().__init__()
        self.alpha, self.k = alpha, k

    def forward(self, x):
        oh = nn.functional.one_hot(x, self.alpha.shape[0]).double()
        c = oh.cumsum(1) - oh
        if x.shape[1] > self.k:
            c = torch.where(torch.arange(x.shape[1])[None, :, None] <= self.k, c, c[:, self.k : self.k + 1])
        return ((self.alpha + c) / (self.alpha.sum() + c.sum(-1, keepdim=True))).log()


def _cfg(out, overrides):
    """The real conf/ composed with a tiny budget (the sizes tests/test_train.py uses)."""
    from bayestrain.train import compose_config

    tiny = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "data.batch_size=8", "data.seq_len=8", "data.val_size=16", "data.train_batches_per_epoch=4",
            "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "callbacks.progress=null"]
    return compose_config(tiny + overrides, out)


def _mc_tolerance(cov: float, n: int) -> float:
    """Three binomial standard errors of a coverage estimated from ``n`` intervals."""
    return 3 * math.sqrt(max(cov * (1 - cov), 0.01) / n)


# ----------------------------------------------------------------------------- exact law
def test_polya_urn_law_is_the_beta_binomial_and_a_martingale():
    scipy_stats = pytest.importorskip("scipy.stats")
    task = Dirichlet(4, alpha=[0.5, 1.0, 2.0, 0.7])
    ctx = task.sample(5, 6, torch.Generator().manual_seed(0))
    H = 9
    atoms, pmf = polya_urn_law(dirichlet_alpha(task), ctx, H)
    assert atoms.shape == pmf.shape == (5, 4, H + 1)
    torch.testing.assert_close(pmf.sum(-1), torch.ones(5, 4, dtype=torch.float64))
    alpha = dirichlet_alpha(task)
    counts = nn.functional.one_hot(ctx, 4).sum(1).double()
    a = alpha + counts
    b = alpha.sum() + 6 - a
    want = scipy_stats.betabinom.pmf(torch.arange(H + 1).numpy(), H, a[..., None].numpy(), b[..., None].numpy())
    torch.testing.assert_close(pmf, torch.from_numpy(want), rtol=1e-10, atol=1e-12)
    # E[p_{n+H}] = p_n: the predictive is a martingale under the Bayes predictor
    p_n = task.posterior_predictive(torch.cat([ctx, ctx[:, :1]], 1))[:, -1]
    torch.testing.assert_close((atoms * pmf).sum(-1), p_n)
    # H = 0: a point mass at the current predictive
    atoms0, pmf0 = polya_urn_law(alpha, ctx, 0)
    torch.testing.assert_close(atoms0[..., 0], p_n)
    assert torch.all(pmf0 == 1)


def test_wasserstein1_is_exact_on_step_functions():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    s, a, w = torch.rand(4, 37, generator=g), torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    got = wasserstein1(s, a, w)
    want = [scipy_stats.wasserstein_distance(s[i].numpy(), a[i].numpy(), v_weights=w[i].numpy()) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert float(wasserstein1(torch.tensor([0.2]), torch.tensor([0.7]))) == pytest.approx(0.5)
    assert float(wasserstein1(s[0], s[0].flip(0))) == pytest.approx(0.0, abs=1e-15)


def test_expected_w1_floor_matches_a_perfect_sampler():
    task = Coin(2.0, 3.0)
    ctx = task.sample(200, 4, torch.Generator().manual_seed(2))
    atoms, pmf = polya_urn_law(dirichlet_alpha(task), ctx, 10)
    atoms, pmf = atoms[:, 1], pmf[:, 1]
    S = 300
    idx = torch.multinomial(pmf, S, replacement=True, generator=torch.Generator().manual_seed(3))
    simulated = wasserstein1(atoms.gather(1, idx), atoms, pmf).mean()
    assert float(simulated) == pytest.approx(float(expected_w1_floor(atoms, pmf, S).mean()), rel=0.1)


def test_central_interval_uses_the_inverse_cdf():
    atoms = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pmf = torch.tensor([0.1, 0.4, 0.4, 0.1])
    lo, hi = central_interval(atoms, 0.8, pmf)  # quantiles at 0.1 and 0.9
    assert (float(lo), float(hi)) == (pytest.approx(0.1), pytest.approx(0.3))
    lo, hi = central_interval(torch.arange(1.0, 11.0), 0.8)
    assert (float(lo), float(hi)) == (1.0, 9.0)


# ----------------------------------------------------------------------------- the two predictors
@pytest.mark.parametrize("task", [Coin(2.0, 3.0), Dirichlet(4, alpha=0.7)], ids=["coin", "dirichlet"])
def test_exact_predictor_reproduces_the_polya_urn_law(task):
    g = torch.Generator().manual_seed(0)
    cmp = compare_posterior(BayesPredictor(task), task, n=6, horizon=8, num_samples=300, num_contexts=32, generator=g)
    s = cmp.summary()
    assert cmp.exact and cmp.draws.shape == (300, 32, task.vocab_size)
    # W1 of a perfect sampler is its Monte Carlo floor (the mean over contexts, coordinates)
    assert s["w1"] <= 1.3 * s["w1_floor"], s
    n_int = 32 * len(cmp.coordinates)
    for level in (50, 80, 90):
        model, exact = s[f"coverage{level}"], s[f"coverage{level}_exact"]
        assert abs(model - exact) <= _mc_tolerance(exact, n_int), (level, model, exact)


@pytest.mark.parametrize("kind", ["recency", "stops_updating"])
def test_order_dependent_predictor_does_not_reproduce_the_law(kind):
    task = Dirichlet(4, alpha=0.7)
    alpha = dirichlet_alpha(task)
    predictor = Recency(alpha, decay=0.8) if kind == "recency" else StopsUpdating(alpha, k=4)
    g = torch.Generator().manual_seed(0)
    cmp = compare_posterior(predictor, task, n=6, horizon=8, num_samples=300, num_contexts=32, generator=g)
    s = cmp.summary()
    assert s["w1"] > 10 * s["w1_floor"], s  # far outside Monte Carlo error
    if kind == "stops_updating":  # a point mass at p_n: its intervals never cover theta
        for level in (50, 80, 90):
            exact = s[f"coverage{level}_exact"]
            assert exact - s[f"coverage{level}"] > _mc_tolerance(exact, 32 * 4), s


def test_mixture_is_compared_with_the_resampled_exact_predictor():
    task = Mixture(3, weights=[0.5, 0.5], alphas=[0.3, 5.0])
    cmp = compare_posterior(BayesPredictor(task), task, n=4, horizon=4, num_samples=64, num_contexts=8,
                            generator=torch.Generator().manual_seed(0), reference_samples=128)
    assert not cmp.exact and cmp.atoms.shape == (8, 3, 128) and cmp.w1_floor is None
    assert cmp.summary()["w1"] < 0.05
    with pytest.raises(ValueError, match="Markov"):
        compare_posterior(BayesPredictor(Markov(3)), Markov(3), n=4, horizon=2, num_samples=4, num_contexts=2)


# ----------------------------------------------------------------------------- rolling the model
def test_cached_roll_matches_the_plain_roll_and_is_reproducible():
    from bayestrain.model import BayesTransformer

    torch.manual_seed(0)
    model = BayesTransformer(5, d_model=16, n_layers=2, n_heads=2, max_len=32, pos_encoding="rope")
    ctx = torch.randint(0, 5, (3, 4))
    kw = dict(horizon=6, num_samples=5)
    cached, paths = predictive_resample(model, ctx, generator=torch.Generator().manual_seed(1), cache=True,
                                        return_paths=True, **kw)
    plain = predictive_resample(model, ctx, generator=torch.Generator().manual_seed(1), cache=False, **kw)
    chunked = predictive_resample(model, ctx, generator=torch.Generator().manual_seed(1), max_rows=4, **kw)
    assert cached.shape == (5, 3, 5) and paths.shape == (5, 3, 6)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, cached, rtol=1e-5, atol=1e-6)
    # the final predictive is the model's own after the drawn path
    x = torch.cat([ctx[None].expand(5, -1, -1), paths], -1).reshape(15, -1)
    direct = model(torch.cat([x, x[:, :1]], 1))[:, -1].double().exp().view(5, 3, 5)
    torch.testing.assert_close(cached, direct / direct.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_set_layout_horizon_zero_and_refusals():
    from bayestrain.model import BayesTransformer

    torch.manual_seed(0)
    model = BayesTransformer(4, d_model=16, n_layers=1, n_heads=2, max_len=16, layout="set", pos_encoding="none")
    ctx = torch.randint(0, 4, (2, 3))
    p = predictive_resample(model, ctx, horizon=3, num_samples=4)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 2, dtype=torch.float64))
    p0 = predictive_resample(model, ctx, horizon=0, num_samples=2)
    want = model.run(torch.cat([ctx, ctx[:, :1]], 1), cut=torch.full((2,), 3)).logp[:, 0].double().exp()
    torch.testing.assert_close(p0[0], want / want.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        predictive_resample(model, ctx, horizon=20, num_samples=2)
    with pytest.raises(ValueError, match="cache=True"):
        predictive_resample(model, ctx, horizon=2, num_samples=2, cache=True)


def test_posterior_figure_is_a_pure_agg_figure(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bayestrain.plots import save_figure

    task = Coin()
    cmp = compare_posterior(BayesPredictor(task), task, n=3, horizon=5, num_samples=50, num_contexts=4,
                            generator=torch.Generator().manual_seed(0))
    fig = posterior_figure(cmp, contexts=(0, 1))
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg) and len(fig.axes) == 2
    assert save_figure(fig, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "exact Polya urn" in cmp.table()


# ----------------------------------------------------------------------------- end to end
def test_eval_posterior_and_fidelity_report_from_a_checkpoint(tmp_path):
    from bayestrain.evaluate import evaluate_posterior, evaluate_report
    from bayestrain.train import train

    run = tmp_path / "run"
    train(_cfg(run, ["task=coin", "logger=none", "summary=false", "callbacks.reliability=null", "trainer.max_steps=2"]))
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    out.mkdir()
    cmp = evaluate_posterior(str(ckpt), n=2, horizon=None, num_samples=40, num_contexts=6, output_dir=out)
    assert cmp.horizon == 8 - 1 - 2  # up to the trained length
    metrics = json.loads((out / "posterior_metrics.json").read_text())
    assert {"w1", "w1_floor", "coverage90", "coverage90_exact"} <= metrics.keys()
    assert (out / "posterior.png").is_file()

    result = evaluate_report(str(ckpt), out, max_sequences=8, posterior=cmp)
    report = (out / "fidelity" / "report.md").read_text()
    for section in ("Bayes gap per position", "per layer and head", "Reliability", "predictive resampling"):
        assert section in report, section
    for png in ("reliability", "bayes_gap_per_position", "violations_per_head", "posterior"):
        assert (out / "fidelity" / f"{png}.png").is_file(), png
    assert len(result["gap_per_position"]) == 8 and len(result["heads"]) == 2  # 1 layer x 2 heads
    assert result["heads"][0]["reversibility"] is None  # causal: does not apply
    assert result["summary"]["exact Bayes"]["bayes_gap_bits"] < 1e-9


def test_fidelity_report_per_head_on_a_set_model_and_wandb(tmp_path):
    pytest.importorskip("wandb")
    from bayestrain.fidelity import fidelity_report
    from bayestrain.model import BayesTransformer

    class Run:  # stands in for an active W&B run
        logged: dict = {}

        def log(self, payload):
            self.logged.update(payload)

    torch.manual_seed(0)
    task = Dirichlet(3)
    model = BayesTransformer(3, d_model=16, n_layers=2, n_heads=2, max_len=16, layout="set", pos_encoding="none",
                             attention="sinkhorn", tied_qk=True)
    x = task.sample(4, 5, torch.Generator().manual_seed(0))
    run = Run()
    result = fidelity_report(model, task, x, tmp_path, wandb_run=run)
    assert len(result["heads"]) == 4
    for row in result["heads"]:
        assert row["reversibility"] is not None and row["reversibility"] < 1e-6  # tied: reversible
        assert row["sinkhorn_residual"] is not None
    assert "fidelity/bayes_gap_per_position" in run.logged and "fidelity/heads" in run.logged
    assert (tmp_path / "report.md").is_file() and (tmp_path / "fidelity.json").is_file()
