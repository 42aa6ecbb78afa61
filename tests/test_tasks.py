"""Wind tunnels: closed forms checked against hand-written loops, samplers against the
predictives (tower property), causality, determinism, validation, and the data module."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from bayestrain.tasks import (
    TASKS,
    BayesPredictor,
    Coin,
    Dirichlet,
    Markov,
    Mixture,
    WindTunnel,
    WindTunnelDataModule,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Asymmetric parameters so that a swapped token or concentration shows up.
TASK_CASES = {
    "coin": lambda: Coin(a=2.0, b=0.5),
    "dirichlet": lambda: Dirichlet(4, alpha=[0.5, 1.0, 2.0, 4.0]),
    "mixture": lambda: Mixture(4, weights=[0.3, 0.7], alphas=[0.2, 5.0]),
    "markov": lambda: Markov(3, alpha=0.5),
}


@pytest.fixture(params=list(TASK_CASES))
def task(request) -> WindTunnel:
    return TASK_CASES[request.param]()


# ----------------------------------------------------------------------------- hand-written closed forms


def coin_by_hand(task: Coin, x):
    out = []
    for seq in x.tolist():
        rows = []
        for t in range(len(seq)):
            ones = sum(seq[:t])
            p1 = (task.a + ones) / (task.a + task.b + t)
            rows.append([1.0 - p1, p1])
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def dirichlet_by_hand(alpha: list[float], x):
    out = []
    for seq in x.tolist():
        rows = []
        for t in range(len(seq)):
            counts = [0] * len(alpha)
            for s in range(t):
                counts[seq[s]] += 1
            rows.append([(alpha[v] + counts[v]) / (sum(alpha) + t) for v in range(len(alpha))])
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def mixture_by_hand(V: int, weights: list[float], alphas: list[float], x):
    weights = [w / sum(weights) for w in weights]
    out = []
    for seq in x.tolist():
        rows = []
        for t in range(len(seq)):
            counts = [seq[:t].count(v) for v in range(V)]
            log_terms = []
            for w, a in zip(weights, alphas):
                log_ml = math.lgamma(V * a) - math.lgamma(V * a + t)
                log_ml += sum(math.lgamma(a + c) - math.lgamma(a) for c in counts)
                log_terms.append(math.log(w) + log_ml)
            top = max(log_terms)
            norm = top + math.log(sum(math.exp(lt - top) for lt in log_terms))
            post = [math.exp(lt - norm) for lt in log_terms]
            rows.append(
                [sum(pk * (a + counts[v]) / (V * a + t) for pk, a in zip(post, alphas)) for v in range(V)]
            )
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def markov_by_hand(V: int, alpha: float, x):
    out = []
    for seq in x.tolist():
        rows = []
        for t in range(len(seq)):
            if t == 0:
                rows.append([1.0 / V] * V)
                continue
            prev = seq[t - 1]
            n = [0] * V
            for s in range(1, t):  # transitions (seq[s-1], seq[s]) inside seq[:t]
                if seq[s - 1] == prev:
                    n[seq[s]] += 1
            rows.append([(alpha + n[v]) / (V * alpha + sum(n)) for v in range(V)])
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def by_hand(task: WindTunnel, x):
    if isinstance(task, Coin):
        return coin_by_hand(task, x)
    if isinstance(task, Dirichlet):
        alpha = task.alpha if isinstance(task.alpha, list) else [task.alpha] * task.vocab_size
        return dirichlet_by_hand(alpha, x)
    if isinstance(task, Mixture):
        return mixture_by_hand(task.vocab_size, task.weights, task.alphas, x)
    if isinstance(task, Markov):
        return markov_by_hand(task.vocab_size, task.alpha, x)
    raise AssertionError(task)


def test_predictive_matches_hand_closed_form(task):
    x = task.sample(6, 15, gen(1))
    expected = by_hand(task, x)
    got = task.posterior_predictive(x)
    assert got.dtype == torch.float64 and got.shape == (6, 15, task.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "task",
    [Dirichlet(5, alpha=0.3), Mixture(3, weights=[2.0, 1.0, 1.0], alphas=[0.05, 1.0, 30.0]), Markov(5, alpha=2.0)],
    ids=repr,
)
def test_predictive_matches_hand_closed_form_other_params(task):
    x = task.sample(4, 20, gen(2))
    torch.testing.assert_close(task.posterior_predictive(x), by_hand(task, x), rtol=0, atol=1e-12)


def test_markov_hand_check_on_fixed_sequence():
    # Transitions inside x[:5] = 0 1 0 1 1: (0,1) (1,0) (0,1) (1,1); row 5 conditions on x_4 = 1.
    x = torch.tensor([[0, 1, 0, 1, 1, 0]])
    p = Markov(2, alpha=1.0).posterior_predictive(x)
    torch.testing.assert_close(p[0, 5], torch.tensor([2 / 4, 2 / 4], dtype=torch.float64))
    # Row 3 conditions on x_2 = 0 with transitions (0,1) (1,0): N[0] = (0, 1).
    torch.testing.assert_close(p[0, 3], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_equivalences():
    x = Dirichlet(6, alpha=0.7).sample(5, 25, gen(3))
    torch.testing.assert_close(
        Mixture(6, weights=[1.0], alphas=[0.7]).posterior_predictive(x),
        Dirichlet(6, alpha=0.7).posterior_predictive(x),
        rtol=0,
        atol=1e-12,
    )
    y = Coin(3.0, 0.4).sample(5, 25, gen(4))
    torch.testing.assert_close(
        Coin(3.0, 0.4).posterior_predictive(y),
        Dirichlet(2, alpha=[0.4, 3.0]).posterior_predictive(y),
        rtol=0,
        atol=1e-15,
    )


def test_rows_sum_to_one_and_log_matches(task):
    x = task.sample(8, 30, gen(5))
    p = task.posterior_predictive(x)
    logp = task.log_posterior_predictive(x)
    torch.testing.assert_close(p.sum(-1), torch.ones(8, 30, dtype=torch.float64), rtol=0, atol=1e-12)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, p.log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(BayesPredictor(task)(x), logp, rtol=0, atol=0)


def test_mixture_long_sequences_stay_finite():
    task = Mixture(8, weights=[0.5, 0.5], alphas=[0.01, 100.0])
    x = task.sample(4, 2000, gen(6))
    logp = task.log_posterior_predictive(x)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 2000, dtype=torch.float64), rtol=0, atol=1e-10)
    # Same log-space computation by hand at the last position of one sequence.
    expected = mixture_by_hand(8, [0.5, 0.5], [0.01, 100.0], x[:1, :])[0, -1]
    torch.testing.assert_close(logp[0, -1].exp(), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- sampler vs predictive


def _assert_within_se(diff: torch.Tensor, what: str, k: float = 4.5):
    """diff (N, ...) has mean zero in theory; check |mean| <= k standard errors."""
    n = diff.shape[0]
    mean = diff.mean(0)
    se = diff.std(0) / math.sqrt(n)
    bad = mean.abs() > k * se + 1e-9
    assert not bad.any(), f"{what}: mean diff {mean[bad]} exceeds {k} SE {se[bad]}"


def test_monte_carlo_tower_property(task):
    """E[1{x_t = v}] = E[p_t(v)] and E[1{x_{t-1} = u, x_t = v}] = E[1{x_{t-1} = u} p_t(v)]."""
    N, T, V = 20000, 6, task.vocab_size
    x = task.sample(N, T, gen(7))
    p = task.posterior_predictive(x)  # (N, T, V)
    one_hot = torch.nn.functional.one_hot(x, V).to(torch.float64)  # (N, T, V)
    _assert_within_se(one_hot - p, f"{task!r} marginals")
    # Pairwise joints test the dependence structure (the marginals of a symmetric mixture
    # are uniform whatever the sampler does).
    prev = one_hot[:, :-1, :, None]  # (N, T-1, V, 1)
    joint_diff = prev * one_hot[:, 1:, None, :] - prev * p[:, 1:, None, :]  # (N, T-1, V, V)
    _assert_within_se(joint_diff, f"{task!r} pair joints")


def test_coin_conditional_frequency():
    a, b = 2.0, 0.5
    x = Coin(a, b).sample(20000, 2, gen(8))
    after_one = x[x[:, 0] == 1, 1].to(torch.float64)
    expected = (a + 1) / (a + b + 1)
    se = math.sqrt(expected * (1 - expected) / after_one.numel())
    assert abs(after_one.mean() - expected) < 4.5 * se
    assert abs(x[:, 0].double().mean() - a / (a + b)) < 4.5 * math.sqrt(0.8 * 0.2 / 20000)


def test_sampled_params_drive_the_tokens(task):
    x, params = task.sample(20, 3000, gen(9), return_params=True)
    V = task.vocab_size
    if isinstance(task, Markov):
        # Empirical transition frequencies out of each visited state.
        pair = torch.nn.functional.one_hot(x[:, :-1] * V + x[:, 1:], V * V).sum(1).view(20, V, V).double()
        n_from = pair.sum(-1, keepdim=True)
        visited = n_from[..., 0] > 200
        freq = pair / n_from.clamp(min=1)
        se = (params * (1 - params) / n_from.clamp(min=1)).sqrt()
        assert ((freq - params).abs() <= 5 * se + 1e-3)[visited].all()
    else:
        freq = torch.nn.functional.one_hot(x, V).double().mean(1)  # (B, V)
        se = (params * (1 - params) / 3000).sqrt()
        assert ((freq - params).abs() <= 5 * se + 1e-3).all()


# ----------------------------------------------------------------------------- structure


def test_causality(task):
    B, T, V = 8, 10, task.vocab_size
    x = task.sample(B, T, gen(10))
    p = task.posterior_predictive(x)
    changed_next = 0
    for t in range(T):
        y = x.clone()
        # Change every token from t on (each to a different symbol).
        y[:, t:] = (x[:, t:] + 1 + torch.randint(0, V - 1, (B, T - t), generator=gen(t))) % V
        q = task.posterior_predictive(y)
        assert torch.equal(q[:, : t + 1], p[:, : t + 1]), f"row <= {t} saw x[:, {t}:]"
        if t + 1 < T:
            changed_next += int(not torch.equal(q[:, t + 1], p[:, t + 1]))
    # ...and the predictive really depends on the past (otherwise the check is vacuous). Markov's
    # row 1 is uniform whatever x_0 is (no transition observed yet), so it cannot change.
    assert changed_next == (T - 2 if isinstance(task, Markov) else T - 1)


def test_determinism(task):
    a = task.sample(16, 12, gen(11))
    b = task.sample(16, 12, gen(11))
    c = task.sample(16, 12, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    x, params = task.sample(16, 12, gen(11), return_params=True)
    assert torch.equal(x, a)  # asking for the parameters does not change the draw
    _, params2 = task.sample(16, 12, gen(11), return_params=True)
    assert torch.equal(params, params2)


def test_sample_shapes_and_params(task):
    V = task.vocab_size
    x, params = task.sample(7, 5, gen(13), return_params=True)
    assert x.shape == (7, 5) and x.dtype == torch.long
    assert x.min() >= 0 and x.max() < V
    assert params.dtype == torch.float64
    expected_shape = (7, V, V) if isinstance(task, Markov) else (7, V)
    assert params.shape == expected_shape
    assert (params >= 0).all()
    torch.testing.assert_close(params.sum(-1), torch.ones(expected_shape[:-1], dtype=torch.float64))
    assert task.sample(0, 5).shape == (0, 5)
    assert task.sample(3, 0).shape == (3, 0)
    assert task.posterior_predictive(task.sample(3, 0)).shape == (3, 0, V)


def test_task_metadata():
    assert TASKS == {"coin": Coin, "dirichlet": Dirichlet, "mixture": Mixture, "markov": Markov}
    for name, cls in TASKS.items():
        task = cls()
        assert task.name == name
        assert task.fixed_prefix == 0 and task.unit_length == 1
        assert task.exchangeable is (name != "markov")
    assert Coin().vocab_size == 2
    assert repr(Coin(2, 3)) == "Coin(a=2.0, b=3.0)"
    assert repr(Mixture(3, weights=[1, 3], alphas=[0.5, 2])) == (
        "Mixture(vocab_size=3, weights=[0.25, 0.75], alphas=[0.5, 2.0])"
    )
    assert "alpha=0.5" in repr(Markov(3, 0.5)) and "vocab_size=3" in repr(Markov(3, 0.5))
    assert "alpha=[1.0, 2.0]" in repr(Dirichlet(2, [1, 2]))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Dirichlet(4, alpha=-1.0), r"alpha must be > 0, got -1.0"),
        (lambda: Dirichlet(4, alpha=[1.0, 2.0]), r"alpha has 2 entries but vocab_size is 4"),
        (lambda: Dirichlet(4, alpha=[1.0, 0.0, 1.0, 1.0]), r"alpha\[1\] must be > 0"),
        (lambda: Dirichlet(1), r"vocab_size must be >= 2, got 1"),
        (lambda: Coin(a=0.0), r"Coin: a must be > 0"),
        (lambda: Coin(b=float("nan")), r"Coin: b must be > 0"),
        (lambda: Markov(4, alpha=-2), r"Markov: alpha must be > 0"),
        (lambda: Markov(2.5), r"vocab_size must be an integer"),
        (lambda: Mixture(4, weights=[0.5, -0.5]), r"weights\[1\] must be > 0"),
        (lambda: Mixture(4, weights=[1.0], alphas=[1.0, 2.0]), r"weights \(1 entries\) and alphas \(2 entries\)"),
        (lambda: Mixture(4, weights=[], alphas=[]), r"non-zero length"),
        (lambda: Mixture(4, alphas=[0.1, 0.0]), r"alphas\[1\] must be > 0"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_observations(task):
    V = task.vocab_size
    with pytest.raises(ValueError, match=rf"x contains token {V} outside the valid range \[0, {V}\)"):
        task.posterior_predictive(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match=r"x contains token -1"):
        task.log_posterior_predictive(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"x must be 2-D \[B, T\], got shape \(3,\)"):
        task.posterior_predictive(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"x must have an integer dtype"):
        task.posterior_predictive(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"batch must be >= 0, got -1"):
        task.sample(-1, 4)
    with pytest.raises(ValueError, match=r"length must be an integer"):
        task.sample(2, 4.0)
    # int32 tokens are accepted.
    x = task.sample(2, 4, gen(0))
    assert torch.equal(task.posterior_predictive(x.int()), task.posterior_predictive(x))


# ----------------------------------------------------------------------------- data module


def test_datamodule_batches():
    dm = WindTunnelDataModule(Markov(3), seq_len=9, batch_size=5, val_size=12, val_batch_size=4,
                              train_batches_per_epoch=3, seed=7)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 3 and len(dm.train_dataloader()) == 3
    for batch in train:
        assert isinstance(batch, torch.Tensor) and batch.shape == (5, 9) and batch.dtype == torch.long
    assert not torch.equal(train[0], train[1])
    # Batch i is drawn from seed * 1_000_003 + i (single process).
    assert torch.equal(train[2], Markov(3).sample(5, 9, gen(7 * 1_000_003 + 2)))

    val = list(dm.val_dataloader())
    assert [v.shape for v in val] == [(4, 9)] * 3
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.long for v in val)
    assert torch.equal(torch.cat(val), dm.val_x)
    assert torch.equal(dm.val_x, Markov(3).sample(12, 9, gen(7 + 12345)))
    # The same fixed set on every call, and as the test set.
    assert torch.equal(torch.cat(list(dm.val_dataloader())), dm.val_x)
    assert torch.equal(torch.cat(list(dm.test_dataloader())), dm.val_x)


def test_datamodule_reproducible_and_epochs():
    make = lambda seed: WindTunnelDataModule(Coin(), seq_len=6, batch_size=4, val_size=8,  # noqa: E731
                                             train_batches_per_epoch=2, seed=seed)
    a, b, c = make(3), make(3), make(4)
    first_a = next(iter(a.train_dataloader()))
    first_b = next(iter(b.train_dataloader()))
    assert torch.equal(first_a, first_b)
    assert torch.equal(a.val_x, b.val_x)
    assert not torch.equal(a.val_x, c.val_x)

    # A fresh module: epoch 0 yields batches 0, 1; epoch 1 yields batches 2, 3.
    dm = make(3)
    loader = dm.train_dataloader()
    iter(loader)  # creating an iterator without drawing does not advance the epoch
    epoch0, epoch1 = list(loader), list(loader)
    expected = [Coin().sample(4, 6, gen(3 * 1_000_003 + i)) for i in range(4)]
    assert all(torch.equal(g, e) for g, e in zip(epoch0 + epoch1, expected))
    # The counter round-trips through the checkpointed state.
    resumed = make(3)
    resumed.load_state_dict(dm.state_dict())
    assert torch.equal(next(iter(resumed.train_dataloader())), Coin().sample(4, 6, gen(3 * 1_000_003 + 4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=1), r"seq_len must be >= 2, got 1"),
        (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
        (dict(val_size=0), r"val_size must be >= 1"),
        (dict(val_batch_size=0), r"val_batch_size must be >= 1"),
        (dict(train_batches_per_epoch=0), r"train_batches_per_epoch must be >= 1"),
        (dict(seed=1.5), r"seed must be an integer"),
    ],
)
def test_datamodule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindTunnelDataModule(Coin(), **kwargs)
    with pytest.raises(ValueError, match=r"task must be a WindTunnel"):
        WindTunnelDataModule("coin")


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.clone()))
        return self.w * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined")
@pytest.mark.filterwarnings("ignore:.*no `validation_step`")
def test_datamodule_with_trainer_advances_epochs():
    dm = WindTunnelDataModule(Dirichlet(3), seq_len=5, batch_size=2, val_size=4, train_batches_per_epoch=2, seed=1)
    module = _Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert [e for e, _ in module.seen] == [0, 0, 1, 1]
    expected = [Dirichlet(3).sample(2, 5, gen(1 * 1_000_003 + i)) for i in range(4)]
    assert all(torch.equal(got, exp) for (_, got), exp in zip(module.seen, expected))
