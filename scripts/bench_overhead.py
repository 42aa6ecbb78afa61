"""Step-time overhead of each condition and mode, and of Lightning over a plain PyTorch loop.

    .venv/bin/python scripts/bench_overhead.py                  # training defaults (conf/)
    .venv/bin/python scripts/bench_overhead.py --threads 1 --rounds 20 --write-docs
    .venv/bin/python scripts/bench_overhead.py --only "penalty: both (default)" data.batch_size=256
    .venv/bin/python scripts/bench_overhead.py --tiny           # seconds-long smoke run

In one process, every configuration is built from the real Hydra config (``build(cfg)``
with the overrides shown in the table) and trained by a Lightning ``Trainer`` on the *same*
pre-drawn batches; the configurations are interleaved in rounds (``--rounds`` rounds of
``--steps`` steps each, in a rotated order every round) so that drift in the machine's load
hits all of them alike.  A step's time is the wall time from one ``on_train_batch_start`` to
the next (forward, conditions, backward, clipping, optimizer, projections and Lightning's own
bookkeeping); the first ``--skip`` steps of every round are dropped (optimizer-state creation
and warm-up), and before each round the cyclic garbage collector is run and frozen, so one
configuration's steps do not pay for scanning the objects the harness keeps for the others.  The table reports the median over all kept steps, and each configuration's
ratio to its unconstrained baseline (``none`` for the causal default model; ``set: none``
for the set-layout model that carries the reversibility projection) as the median over rounds
of the ratio of the two round medians (paired: the two ran seconds apart, under the same
machine load).

``plain loop`` trains a copy of the ``none`` model on the same batches with the same
optimizer, kind of schedule, loss and gradient clipping, without Lightning; ``none`` over ``plain loop`` is the
Lightning module's overhead.  Progress bar, checkpointing, validation and loggers are off
(the logger backend's cost is not the module's); everything else is the training default
(``log_every_n_steps``, ``gradient_clip_val``, precision).  Projection-mode conditions log their
violation only on logging steps (every ``log_every_n_steps``), which a round of ``--steps``
steps from a fresh Trainer does not reach past its first (skipped) step: the medians are those
of the ordinary steps.  On a shared machine prefer ``--threads 1`` and many short rounds.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from bayestrain.report import quiet_lightning, update_docs
from bayestrain.train import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# name, overrides, baseline name (None: this is a baseline)
CONFIGS: list[tuple[str, list[str], str | None]] = [
    ("none", ["condition=none"], None),
    ("measure (both)", ["condition=measure"], "none"),
    ("penalty: exchangeability", ["condition=exchangeability"], "none"),
    ("penalty: martingale", ["condition=martingale"], "none"),
    ("penalty: martingale_l2", ["condition=martingale_l2"], "none"),
    ("penalty: both (default)", ["condition=sequence"], "none"),
    ("penalty: prior_consistency", ["condition=prior_consistency"], "none"),
    ("lagrangian: both", ["condition=sequence", "condition.exchangeability.mode=lagrangian",
                          "condition.martingale.mode=lagrangian"], "none"),
    ("set: none", ["model=set_sinkhorn", "condition=none"], None),
    ("set: projection (reversibility)", ["model=set_sinkhorn", "condition=reversibility"], "set: none"),
]
CONFIGS_BY_NAME = {c[0]: c for c in CONFIGS}
PLAIN = "plain loop (no Lightning)"

TINY = ["data.batch_size=8", "data.seq_len=8", "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]


class _StepClock:
    """Lightning callback: wall time at the start of every training batch."""

    def __new__(cls):
        import lightning.pytorch as pl

        class Clock(pl.Callback):
            def __init__(self):
                self.starts: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.last_end = time.perf_counter()

        return Clock()


class LightningRunner:
    """One configuration: a module built from the config, trained a round at a time."""

    def __init__(self, name: str, overrides: list[str], out: Path, seed: int):
        from lightning.pytorch import seed_everything

        from bayestrain.train import build

        seed_everything(seed, workers=False, verbose=False)
        self.name, self.overrides = name, overrides
        self.cfg = compose_config([*overrides, "logger=none", f"seed={seed}"], out)
        self.objs = build(self.cfg)
        self.module = self.objs["module"]
        self.times: list[float] = []
        self.round_medians: list[float] = []

    def round(self, batches: list[torch.Tensor], skip: int) -> None:
        from hydra.utils import instantiate
        from torch.utils.data import DataLoader

        clock = _StepClock()
        trainer = instantiate(
            self.cfg.trainer, max_steps=len(batches), max_epochs=1, val_check_interval=1.0,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        )
        trainer.fit(self.module, train_dataloaders=DataLoader(batches, batch_size=None))
        starts = clock.starts + [clock.last_end]
        kept = [b - a for a, b in zip(starts[:-1], starts[1:])][skip:]
        self.times += kept
        if kept:
            self.round_medians.append(statistics.median(kept))


class PlainRunner:
    """The same model trained by a plain loop: forward, NLL, backward, clip, step, and a
    scheduler of the same kind stepped every step as Lightning does (its values do not matter
    for the timing; one long schedule serves all rounds)."""

    def __init__(self, reference: LightningRunner):
        self.name = PLAIN
        self.overrides = reference.overrides
        module = reference.module
        self.model = copy.deepcopy(module.model)
        self.opt = module.optimizer_factory(self.model.parameters())
        factory = module.scheduler_factory
        self.sched = factory(self.opt, total_steps=10**6) if factory is not None else None
        self.clip = reference.cfg.trainer.get("gradient_clip_val") or None
        self.times: list[float] = []
        self.round_medians: list[float] = []

    def round(self, batches: list[torch.Tensor], skip: int) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        starts = []
        for x in batches:
            starts.append(time.perf_counter())
            logp = self.model(x)
            loss = -logp.gather(-1, x[..., None]).mean()
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(params, self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.sched is not None:
                self.sched.step()
        starts.append(time.perf_counter())
        kept = [b - a for a, b in zip(starts[:-1], starts[1:])][skip:]
        self.times += kept
        if kept:
            self.round_medians.append(statistics.median(kept))


def measure(configs, rounds: int, steps: int, skip: int, seed: int, extra: list[str], out: Path,
            warmup: bool = True, verbose: bool = True, freeze_gc: bool = True) -> dict[str, dict]:
    runners = []
    for name, overrides, _ in configs:
        runners.append(LightningRunner(name, [*overrides, *extra], out / f"r{len(runners)}", seed))
        if name == "none":
            runners.append(PlainRunner(runners[-1]))
    task = runners[0].objs["task"]
    data = runners[0].objs["datamodule"]
    g = torch.Generator().manual_seed(seed + 7)
    batches = [task.sample(data.batch_size, data.seq_len, g) for _ in range(steps)]
    if warmup:
        for r in runners:  # warm-up round, not recorded
            r.round(batches[: min(steps, skip + 2)], skip=len(batches))
    for k in range(rounds):
        order = runners[k % len(runners):] + runners[: k % len(runners)]  # rotate the order
        for r in order:
            if freeze_gc:
                # the harness keeps every configuration's module (and the finished trainers'
                # garbage) alive: collect it and exempt what survives from the cyclic GC, so a
                # configuration's steps do not pay for scanning the others' objects
                gc.collect()
                gc.freeze()
            r.round(batches, skip)
        if verbose:
            print(f"round {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    if freeze_gc:
        gc.unfreeze()
    base = {name: b for name, _, b in configs}
    base[PLAIN] = None
    rows = {}
    for r in runners:
        rows[r.name] = {"ms": 1e3 * statistics.median(r.times), "n": len(r.times), "rounds": r.round_medians,
                        "baseline": base[r.name], "overrides": " ".join(r.overrides)}

    def paired(name: str, ref: str) -> float:
        """Median over rounds of the ratio of round medians: each configuration is compared
        with its baseline timed seconds apart, under the same machine load."""
        a, b = rows[name]["rounds"], rows[ref]["rounds"]
        return statistics.median(x / y for x, y in zip(a, b))

    for name, row in rows.items():
        ref = row["baseline"]
        row["ratio"] = paired(name, ref) if ref else None
    if "none" in rows and PLAIN in rows:
        rows["none"]["ratio_vs_plain"] = paired("none", PLAIN)
    return rows


def table(rows: dict[str, dict], title: str) -> str:
    lines = [title, "", "| configuration | ms/step (median) | ratio (paired median) | vs | steps timed |",
             "|---|---:|---:|---|---:|"]
    for name, r in rows.items():
        if r.get("ratio_vs_plain") is not None:
            ratio, vs = f"{r['ratio_vs_plain']:.3f}", PLAIN
        elif r["ratio"] is not None:
            ratio, vs = f"{r['ratio']:.3f}", r["baseline"]
        else:
            ratio, vs = "1", "(baseline)"
        lines.append(f"| {name} | {r['ms']:.2f} | {ratio} | {vs} | {r['n']} |")
    return "\n".join(lines)


def goals(rows: dict[str, dict]) -> list[str]:
    out = []
    checks = [("penalty: both (default)", "ratio", 1.5), ("set: projection (reversibility)", "ratio", 1.02),
              ("none", "ratio_vs_plain", 1.10)]
    for name, key, limit in checks:
        if name in rows and rows[name].get(key) is not None:
            v = rows[name][key]
            out.append(f"{'met ' if v <= limit else 'MISSED'}  {name}: {v:.3f} x (goal <= {limit} x)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    ap.add_argument("--skip", type=int, default=2, help="steps dropped at the start of every round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="a configuration to run (repeatable; 'none' and the baselines always run; default: all)")
    ap.add_argument("--no-freeze-gc", action="store_true", help="do not gc.collect()+gc.freeze() before each round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--tiny", action="store_true", help="tiny model and data, one round of 4 steps (smoke test)")
    ap.add_argument("--write-docs", action="store_true", help="update the bench_overhead section of docs/results.md")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every configuration")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    extra = list(args.overrides)
    if args.tiny:
        extra = TINY + extra
        args.rounds, args.steps, args.skip = 1, min(args.steps, 4), min(args.skip, 1)
    wanted = set(CONFIGS_BY_NAME) if args.only is None else {"none", *args.only}
    unknown = wanted - set(CONFIGS_BY_NAME)
    if unknown:
        ap.error(f"unknown configuration(s) {sorted(unknown)}; choose from {list(CONFIGS_BY_NAME)}")
    wanted |= {CONFIGS_BY_NAME[n][2] for n in wanted if CONFIGS_BY_NAME[n][2]}  # and their baselines
    configs = [c for c in CONFIGS if c[0] in wanted]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(configs, args.rounds, args.steps, args.skip, args.seed, extra, Path(tmp),
                       warmup=not args.tiny, freeze_gc=not args.no_freeze_gc)
    size = "tiny" if args.tiny else "training defaults"
    title = (f"Step time, {size}{' + ' + ' '.join(args.overrides) if args.overrides else ''}: median of "
             f"{args.rounds} interleaved rounds x {args.steps - args.skip} steps, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, CPU")
    tab = table(rows, title)
    print(tab)
    goal_lines = goals(rows)
    for line in goal_lines:
        print(line)
    if args.write_docs:
        import datetime

        cmd = "python scripts/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join(["## Step-time overhead (`scripts/bench_overhead.py`)", "", f"Command: `{cmd.strip()}`  ",
                          f"Date: {datetime.date.today().isoformat()}.", "", tab, "",
                          *[f"- {g}" for g in goal_lines]])
        update_docs(args.docs, "bench_overhead", text)
        print(f"written: {args.docs}")
    return rows


if __name__ == "__main__":
    main()
