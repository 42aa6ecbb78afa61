"""Wind tunnels: synthetic tasks whose exact posterior predictive is known in closed form.

Every task follows the predictor convention of DESIGN.md section 1: for observations
``x: LongTensor[B, T]`` the predictive ``p[:, t]`` is ``p(X_{t+1} = . | x[:, :t])``, so row 0
is the prior predictive and row ``t`` never looks at ``x[:, t]``.

Samplers are vectorized over the batch and seeded only by a ``torch.Generator``. torch
cannot draw Gamma/Dirichlet variates from an explicit generator, so the latent parameters
are drawn with numpy from a seed taken out of the generator, and the tokens with torch.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

__all__ = [
    "WindTunnel",
    "Coin",
    "Dirichlet",
    "Mixture",
    "Markov",
    "BayesPredictor",
    "WindTunnelDataModule",
    "TASKS",
]


# ----------------------------------------------------------------------------- validation


def _check_int(owner: str, name: str, value, minimum: int, fix: str) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}; {fix}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}; {fix}")
    return int(value)


def _check_positive(owner: str, name: str, value, fix: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}; {fix}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be > 0, got {value}; {fix}")
    return value


def _check_positive_list(owner: str, name: str, values, fix: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{owner}: {name} must be a list of positive numbers, got {values!r}; {fix}")
    return [_check_positive(owner, f"{name}[{i}]", v, fix) for i, v in enumerate(values)]


def _param_seed(generator: torch.Generator | None) -> int:
    """A numpy seed drawn from ``generator``, so the torch generator alone fixes the draw."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def _sample_categorical(theta: torch.Tensor, length: int, generator) -> torch.Tensor:
    """``length`` i.i.d. draws from each row of ``theta`` (B, V) by inverse CDF -> (B, T)."""
    cdf = theta.cumsum(-1)  # (B, V)
    # Divide by the last entry so the CDF ends at exactly 1.0 and u < 1 always finds a bin;
    # zero-probability bins have zero width and can never be hit.
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(theta.shape[0], length, dtype=torch.float64, generator=generator)  # (B, T)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=theta.shape[1] - 1)


def _exclusive_counts(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """counts[b, t, v] = #{s < t : x[b, s] = v}, as float64 (B, T, V)."""
    one_hot = torch.nn.functional.one_hot(x, vocab_size).to(torch.float64)  # (B, T, V)
    # Inclusive cumsum minus the current token = counts of the strict past (exact in float64).
    return one_hot.cumsum(1) - one_hot


# ----------------------------------------------------------------------------- base class


class WindTunnel(ABC):
    """A task with a closed-form posterior predictive (the exact Bayes predictor)."""

    name: str = "wind_tunnel"
    vocab_size: int
    exchangeable: bool
    # Exchangeability metadata read by the conditions (DESIGN.md 2.1).
    fixed_prefix: int = 0
    unit_length: int = 1

    # -- sampling

    def sample(
        self,
        batch: int,
        length: int,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ):
        """Draw ``batch`` sequences of ``length`` tokens -> LongTensor (B, T).

        With ``return_params=True`` returns ``(x, params)``, the latent parameters as float64.
        Deterministic given the generator's state (``None``: torch's global generator).
        """
        owner = type(self).__name__
        batch = _check_int(owner, "batch", batch, 0, "pass the number of sequences to draw")
        length = _check_int(owner, "length", length, 0, "pass the number of tokens per sequence")
        x, params = self._sample(batch, length, generator)
        return (x, params) if return_params else x

    @abstractmethod
    def _sample(self, batch: int, length: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x (B, T) long, params float64); arguments already validated."""

    # -- exact predictives

    def posterior_predictive(self, x: torch.Tensor) -> torch.Tensor:
        """p(X_{t+1} = . | x[:, :t]) for every t -> float64 (B, T, V)."""
        return self._probs(self._check_x(x))

    def log_posterior_predictive(self, x: torch.Tensor) -> torch.Tensor:
        """log p(X_{t+1} = . | x[:, :t]) for every t -> float64 (B, T, V)."""
        return self._log_probs(self._check_x(x))

    @abstractmethod
    def _probs(self, x: torch.Tensor) -> torch.Tensor: ...

    def _log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self._probs(x).log()

    def _check_x(self, x) -> torch.Tensor:
        """Validate observations and return them as int64 (B, T)."""
        owner = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{owner}: x must be a LongTensor of shape [B, T], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(
                f"{owner}: x must be 2-D [B, T], got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single sequence"
            )
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{owner}: x must have an integer dtype (token ids), got {x.dtype}; use x.long()")
        bad = (x < 0) | (x >= self.vocab_size)
        if bad.any():  # one host sync; the offending value is only looked up on error
            value = int(x[bad][0])
            raise ValueError(
                f"{owner}: x contains token {value} outside the valid range [0, {self.vocab_size}) "
                f"of {self!r}; tokens must be in 0..{self.vocab_size - 1}"
            )
        return x.long()


# ----------------------------------------------------------------------------- tasks


class Dirichlet(WindTunnel):
    """theta ~ Dir(alpha), x_t ~ Cat(theta); predictive (alpha_v + c_v) / (sum(alpha) + t).

    ``alpha`` is a scalar (symmetric prior) or a list of ``vocab_size`` concentrations.
    """

    name = "dirichlet"
    exchangeable = True

    def __init__(self, vocab_size: int = 8, alpha: float | list[float] = 1.0):
        self.vocab_size = _check_int("Dirichlet", "vocab_size", vocab_size, 2, "pass the number of symbols (>= 2)")
        fix = "pass a positive concentration"
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            alpha_list = [_check_positive("Dirichlet", "alpha", alpha, fix)] * self.vocab_size
            self.alpha: float | list[float] = float(alpha)
        else:
            alpha_list = _check_positive_list("Dirichlet", "alpha", alpha, fix)
            if len(alpha_list) != self.vocab_size:
                raise ValueError(
                    f"Dirichlet: alpha has {len(alpha_list)} entries but vocab_size is {self.vocab_size}; "
                    "pass one concentration per symbol or a scalar for a symmetric prior"
                )
            self.alpha = alpha_list
        self._alpha = torch.tensor(alpha_list, dtype=torch.float64)  # (V,)

    def __repr__(self) -> str:
        return f"Dirichlet(vocab_size={self.vocab_size}, alpha={self.alpha})"

    def _sample(self, batch, length, generator):
        rng = np.random.default_rng(_param_seed(generator))
        theta = torch.from_numpy(rng.dirichlet(self._alpha.numpy(), size=batch))  # (B, V)
        return _sample_categorical(theta, length, generator), theta

    def _probs(self, x):
        alpha = self._alpha.to(x.device)  # (V,)
        counts = _exclusive_counts(x, self.vocab_size)  # (B, T, V)
        t = torch.arange(x.shape[1], dtype=torch.float64, device=x.device)  # (T,)
        return (alpha + counts) / (alpha.sum() + t)[:, None]

    def _log_probs(self, x):
        alpha = self._alpha.to(x.device)
        counts = _exclusive_counts(x, self.vocab_size)  # (B, T, V)
        t = torch.arange(x.shape[1], dtype=torch.float64, device=x.device)  # (T,)
        return (alpha + counts).log() - (alpha.sum() + t).log()[:, None]


class Coin(Dirichlet):
    """theta ~ Beta(a, b), x_t ~ Bernoulli(theta); token 1 is a success.

    Predictive for token 1: (a + #ones) / (a + b + t). Same as Dirichlet(2, alpha=[b, a]).
    """

    name = "coin"

    def __init__(self, a: float = 1.0, b: float = 1.0):
        self.a = _check_positive("Coin", "a", a, "pass a positive Beta shape")
        self.b = _check_positive("Coin", "b", b, "pass a positive Beta shape")
        # Token 0 is a failure (weight b), token 1 a success (weight a).
        super().__init__(vocab_size=2, alpha=[self.b, self.a])

    def __repr__(self) -> str:
        return f"Coin(a={self.a}, b={self.b})"

    def _sample(self, batch, length, generator):
        rng = np.random.default_rng(_param_seed(generator))
        p = torch.from_numpy(rng.beta(self.a, self.b, size=batch))  # (B,) success probability
        theta = torch.stack([1.0 - p, p], dim=1)  # (B, 2)
        return _sample_categorical(theta, length, generator), theta


class Mixture(WindTunnel):
    """theta from a mixture of symmetric Dirichlets: k ~ Cat(weights), theta ~ Dir(alphas[k] 1).

    ``weights`` must be positive and are normalized to sum to 1. The posterior over the
    component uses Dirichlet-multinomial marginal likelihoods, all in log space.
    """

    name = "mixture"
    exchangeable = True

    def __init__(
        self,
        vocab_size: int = 8,
        weights: Sequence[float] = (0.5, 0.5),
        alphas: Sequence[float] = (0.1, 10.0),
    ):
        self.vocab_size = _check_int("Mixture", "vocab_size", vocab_size, 2, "pass the number of symbols (>= 2)")
        w = _check_positive_list("Mixture", "weights", weights, "pass positive mixture weights (they are normalized)")
        a = _check_positive_list("Mixture", "alphas", alphas, "pass a positive concentration per component")
        if len(w) == 0 or len(w) != len(a):
            raise ValueError(
                f"Mixture: weights ({len(w)} entries) and alphas ({len(a)} entries) must have the same, "
                "non-zero length; pass one weight per component"
            )
        total = sum(w)
        self.weights = [v / total for v in w]
        self.alphas = a
        self._log_w = torch.tensor(self.weights, dtype=torch.float64).log()  # (K,)
        self._alphas = torch.tensor(a, dtype=torch.float64)  # (K,)

    def __repr__(self) -> str:
        return f"Mixture(vocab_size={self.vocab_size}, weights={self.weights}, alphas={self.alphas})"

    def _sample(self, batch, length, generator):
        rng = np.random.default_rng(_param_seed(generator))
        V = self.vocab_size
        component = rng.choice(len(self.weights), size=batch, p=self.weights)  # (B,)
        theta = np.empty((batch, V))
        # Loop over components (not the batch): numpy's dirichlet stays valid at tiny alphas,
        # where normalized Gamma draws can all underflow to zero.
        for k, a in enumerate(self.alphas):
            rows = component == k
            theta[rows] = rng.dirichlet(np.full(V, a), size=int(rows.sum()))
        theta = torch.from_numpy(theta)  # (B, V)
        return _sample_categorical(theta, length, generator), theta

    def _log_probs(self, x):
        V = self.vocab_size
        a = self._alphas.to(x.device)  # (K,)
        log_w = self._log_w.to(x.device)  # (K,)
        counts = _exclusive_counts(x, V)[:, :, None, :]  # (B, T, 1, V)
        n = torch.arange(x.shape[1], dtype=torch.float64, device=x.device)[:, None]  # (T, 1)

        # Sequence log marginal likelihood of the counts under each component (the
        # multinomial coefficient is omitted: it is the same for every component).
        log_ml = (
            torch.lgamma(V * a)
            - torch.lgamma(V * a + n)  # (T, K)
            + (torch.lgamma(a[:, None] + counts) - torch.lgamma(a)[:, None]).sum(-1)  # (B, T, K)
        )
        log_post = log_w + log_ml
        log_post = log_post - log_post.logsumexp(-1, keepdim=True)  # (B, T, K)

        # Per-component Dirichlet predictive, mixed with the posterior component weights.
        log_pred_k = (a[:, None] + counts).log() - (V * a + n).log()[..., None]  # (B, T, K, V)
        return (log_post[..., None] + log_pred_k).logsumexp(-2)  # (B, T, V)

    def _probs(self, x):
        return self._log_probs(x).exp()


class Markov(WindTunnel):
    """First-order Markov chain: each transition row ~ Dir(alpha 1), first symbol uniform.

    Predictive at t >= 1: (alpha + N[x_{t-1}, v]) / (V alpha + N[x_{t-1}, :].sum()), with N
    the transition counts inside x[:, :t]. Not exchangeable. Memory O(B T V^2).
    """

    name = "markov"
    exchangeable = False

    def __init__(self, vocab_size: int = 4, alpha: float = 1.0):
        self.vocab_size = _check_int("Markov", "vocab_size", vocab_size, 2, "pass the number of states (>= 2)")
        self.alpha = _check_positive("Markov", "alpha", alpha, "pass a positive concentration")

    def __repr__(self) -> str:
        return f"Markov(vocab_size={self.vocab_size}, alpha={self.alpha})"

    def _sample(self, batch, length, generator):
        V = self.vocab_size
        rng = np.random.default_rng(_param_seed(generator))
        trans = torch.from_numpy(rng.dirichlet(np.full(V, self.alpha), size=(batch, V)))  # (B, V, V)
        cdf = trans.cumsum(-1)
        cdf = cdf / cdf[..., -1:]  # exact 1.0 at the end, as in _sample_categorical
        x = torch.empty(batch, length, dtype=torch.long)
        if length == 0:
            return x, trans
        u = torch.rand(batch, length, dtype=torch.float64, generator=generator)  # (B, T)
        u = u.t().contiguous()  # (T, B): each step reads one contiguous row
        x[:, 0] = (u[0] * V).long().clamp_(max=V - 1)  # uniform first symbol
        rows = torch.arange(batch)
        for t in range(1, length):  # the chain is sequential; the batch is vectorized
            cdf_t = cdf[rows, x[:, t - 1]]  # (B, V)
            x[:, t] = torch.searchsorted(cdf_t, u[t, :, None], right=True)[:, 0].clamp_(max=V - 1)
        return x, trans

    def _probs(self, x):
        B, T = x.shape
        V = self.vocab_size
        probs = torch.full((B, T, V), 1.0 / V, dtype=torch.float64, device=x.device)  # row 0: uniform
        if T < 2:
            return probs
        # Transition s (1 <= s < T) is the pair (x[s-1], x[s]); index it as one of V*V cells.
        pair = x[:, :-1] * V + x[:, 1:]  # (B, T-1)
        one_hot = torch.nn.functional.one_hot(pair, V * V)  # (B, T-1, V*V)
        # Row t >= 1 may use transitions s = 1..t-1 only: exclusive cumsum over transitions.
        past = (one_hot.cumsum(1) - one_hot).view(B, T - 1, V, V)  # (B, T-1, V, V)
        prev = x[:, :-1]  # x[t-1] for rows t = 1..T-1
        index = prev[:, :, None, None].expand(B, T - 1, 1, V)
        n = past.gather(2, index)[:, :, 0, :].to(torch.float64)  # (B, T-1, V): N[x_{t-1}, :]
        probs[:, 1:] = (self.alpha + n) / (V * self.alpha + n.sum(-1, keepdim=True))
        return probs


TASKS: dict[str, type[WindTunnel]] = {
    "coin": Coin,
    "dirichlet": Dirichlet,
    "mixture": Mixture,
    "markov": Markov,
}


# ----------------------------------------------------------------------------- oracle


class BayesPredictor(torch.nn.Module):
    """The exact Bayes predictor of a wind tunnel: ``forward(x) -> logp`` float64 (B, T, V)."""

    def __init__(self, task: WindTunnel):
        super().__init__()
        if not isinstance(task, WindTunnel):
            raise ValueError(f"BayesPredictor: task must be a WindTunnel, got {type(task).__name__}")
        self.task = task
        self.vocab_size = task.vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.log_posterior_predictive(x)

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


# ----------------------------------------------------------------------------- data


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _stack_first(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    """Collate TensorDataset 1-tuples into a plain (B, T) tensor (module-level: picklable)."""
    return torch.stack([item[0] for item in items])


class _StreamDataset(IterableDataset):
    """Endless fresh samples, already batched; epoch e yields global batches e*N .. e*N+N-1.

    Batch i on rank r of w is drawn from ``seed * 1_000_003 + i * w + r``: reproducible, and
    distinct across DDP ranks. The epoch advances by one each time an iteration starts (the
    counter moves on the first ``next``, so merely creating an iterator does not count);
    ``set_epoch`` overrides it. Lightning's own ``set_epoch`` calls only reach samplers, which
    an IterableDataset cannot have, so the dataset keeps count itself. Use ``num_workers=0``:
    worker processes would each keep their own copy of the counter.
    """

    def __init__(self, task: WindTunnel, seq_len: int, batch_size: int, batches_per_epoch: int, seed: int):
        self.task = task
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.epoch = 0
        self.position_fn = None  # () -> batches consumed so far, or None (set by the data module)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batch_seed(self, index: int) -> int:
        rank, world = _dist_rank_world()
        # Reduce into the generator's seed range so large seeds cannot overflow.
        return (self.seed * 1_000_003 + index * world + rank) % (2**63)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self.epoch
        self.epoch += 1
        start = epoch * self.batches_per_epoch
        end = start + self.batches_per_epoch
        consumed = self.position_fn() if self.position_fn is not None else None
        if consumed is not None:
            # under a Trainer the stream position is the number of batches already trained on,
            # so a run resumed mid-epoch continues with the very batches it would have seen
            start, end = consumed, (consumed // self.batches_per_epoch + 1) * self.batches_per_epoch
            self.epoch = consumed // self.batches_per_epoch + 1
        for index in range(start, end):
            generator = torch.Generator().manual_seed(self.batch_seed(index))
            yield self.task.sample(self.batch_size, self.seq_len, generator)


class WindTunnelDataModule(pl.LightningDataModule):
    """Streams freshly sampled training batches from a wind tunnel; a fixed validation set.

    Train and validation batches are both plain LongTensor (B, T). The validation set
    (``val_size`` sequences, drawn from ``seed + 12345``) also serves as the test set; its exact
    predictive is left to the module (``task.posterior_predictive``), not stored.
    """

    def __init__(
        self,
        task: WindTunnel,
        seq_len: int = 32,
        batch_size: int = 64,
        val_size: int = 1024,
        val_batch_size: int | None = None,
        train_batches_per_epoch: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        owner = "WindTunnelDataModule"
        if not isinstance(task, WindTunnel):
            raise ValueError(
                f"{owner}: task must be a WindTunnel (Coin, Dirichlet, Mixture, Markov), got {type(task).__name__}"
            )
        self.task = task
        self.seq_len = _check_int(owner, "seq_len", seq_len, 2, "sequences need at least 2 tokens")
        self.batch_size = _check_int(owner, "batch_size", batch_size, 1, "pass a positive batch size")
        self.val_size = _check_int(owner, "val_size", val_size, 1, "pass a positive number of validation sequences")
        if val_batch_size is not None:
            val_batch_size = _check_int(owner, "val_batch_size", val_batch_size, 1, "pass a positive batch size or None")
        self.val_batch_size = val_batch_size or self.batch_size
        self.train_batches_per_epoch = _check_int(
            owner, "train_batches_per_epoch", train_batches_per_epoch, 1, "pass a positive number of batches"
        )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"{owner}: seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.save_hyperparameters(ignore=["task"])
        self.train_dataset = _StreamDataset(task, self.seq_len, self.batch_size, self.train_batches_per_epoch, self.seed)
        self._val_x: torch.Tensor | None = None

    @property
    def val_x(self) -> torch.Tensor:
        """The fixed validation sequences (val_size, seq_len), sampled once on first use."""
        if self._val_x is None:
            generator = torch.Generator().manual_seed(self.seed + 12345)
            self._val_x = self.task.sample(self.val_size, self.seq_len, generator)
        return self._val_x

    def setup(self, stage: str | None = None) -> None:
        self.val_x  # noqa: B018 - sample the validation set up front, not inside the loop

    def _batches_consumed(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        self.train_dataset.position_fn = self._batches_consumed
        return DataLoader(self.train_dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.val_x), batch_size=self.val_batch_size, shuffle=False, collate_fn=_stack_first
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # The epoch counter is checkpointed so a resumed run continues the same stream.
    def state_dict(self) -> dict:
        return {"train_epoch": self.train_dataset.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_dataset.set_epoch(state_dict["train_epoch"])
