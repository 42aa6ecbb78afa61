"""DDP throughput against one process, and the cost of checkpointing, on this machine.

    .venv/bin/python scripts/bench_scale.py            # 200 steps each
    .venv/bin/python scripts/bench_scale.py --tiny     # seconds

Throughput is sequences per second of training (validation and the summary switched off), for
one process and for 2-process DDP (ddp_spawn; gloo on CPU), each with the same per-rank batch:
DDP trains on twice the data per step.  Checkpoint cost: the median time of
``trainer.save_checkpoint`` (atomic write) against the median training step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

from bayestrain.train import compose_config, train


class StepTimer(pl.Callback):
    def __init__(self):
        self.times, self._t = [], None

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._t)


def run(overrides, out: Path) -> float:
    cfg = compose_config(overrides, out)
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    steps = 6 if args.tiny else args.steps
    base = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "+trainer.limit_val_batches=0",
            "logger=none", "summary=false", "callbacks.progress=null", f"data.train_batches_per_epoch={steps}"]
    if args.tiny:
        base += ["data.batch_size=8", "data.seq_len=8", "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(base, Path(tmp) / "probe")
        batch = cfg.data.batch_size
        for name, extra, world in [("1 process", [], 1), ("DDP 2 processes (ddp_spawn, gloo)", ["trainer=ddp_spawn"], 2)]:
            secs = run(base + extra, Path(tmp) / name.split()[0])
            results[name] = steps * batch * world / secs

        # checkpoint cost, in-process: a real module and trainer, timed saves vs timed steps
        timer = StepTimer()
        cfg = compose_config(base, Path(tmp) / "ckpt")
        from hydra.utils import instantiate

        from bayestrain.checkpoint import AtomicCheckpointIO
        from bayestrain.train import build

        objs = build(cfg)
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[timer], plugins=[AtomicCheckpointIO()],
                             enable_checkpointing=False)
        trainer.fit(objs["module"], datamodule=objs["datamodule"])
        saves = []
        for i in range(5):
            t0 = time.perf_counter()
            trainer.save_checkpoint(Path(tmp) / f"c{i}.ckpt")
            saves.append(time.perf_counter() - t0)
        step_ms = statistics.median(timer.times) * 1e3
        save_ms = statistics.median(saves) * 1e3
        interval = compose_config([], Path(tmp) / "default").trainer.val_check_interval
    one = results["1 process"]
    print(f"# {steps} training steps, batch {batch} per rank; sequences/s (higher is better)")
    print(f"{'configuration':<38}{'seq/s':>10}{'x 1 process':>13}")
    for name, r in results.items():
        print(f"{name:<38}{r:>10.1f}{r / one:>13.2f}")
    print(f"\n# checkpointing: median save {save_ms:.1f} ms, median step {step_ms:.1f} ms; at one checkpoint "
          f"per {interval} steps (the default interval) the overhead is {save_ms / (interval * step_ms):.2%}")
    return {"throughput": results, "save_ms": save_ms, "step_ms": step_ms, "interval": interval}


if __name__ == "__main__":
    main()
