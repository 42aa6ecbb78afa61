"""Side by side: the same model, budget and seed trained with and without the Bayes
conditions, each beside the exact Bayes predictor on the same validation set.

    .venv/bin/python scripts/compare_conditions.py                     # none vs the default penalty
    .venv/bin/python scripts/compare_conditions.py --steps 50 --tiny  # smoke test
    .venv/bin/python scripts/compare_conditions.py --runs none:condition=none \
        causal:condition=sequence set:experiment=set_sinkhorn_dirichlet

Each run is ``name:override[,override...]`` (Hydra overrides); all share the task, budget and
seed given here.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bayestrain.report import summary_table
from bayestrain.train import compose_config, train


def run(overrides: list[str], out: Path) -> tuple[dict, float]:
    cfg = compose_config(overrides, out)
    start = time.perf_counter()
    result = train(cfg)
    return result["summary"], time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["none:condition=none", "sequence:condition=sequence"])
    ap.add_argument("--task", default="dirichlet")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and data (smoke test)")
    args = ap.parse_args(argv)
    overrides = [f"task={args.task}", f"trainer.max_steps={args.steps}", f"seed={args.seed}",
                 f"trainer.val_check_interval={max(1, min(250, args.steps))}", "logger=none",
                 "callbacks.progress=null"]
    if args.tiny:
        overrides += ["data.batch_size=16", "data.seq_len=8", "data.val_size=32", "data.train_batches_per_epoch=10",
                      "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            name, _, extra = spec.partition(":")
            summary, secs = run([*extra.split(","), *overrides] if extra else overrides, Path(tmp) / name)
            rows[f"{name} ({secs:.0f}s)"] = summary["model"]
            rows["exact Bayes"] = summary["exact Bayes"]
    rows["exact Bayes"] = rows.pop("exact Bayes")  # last row
    print(summary_table(rows, title=f"{args.task}, {args.steps} steps, seed {args.seed}: validation set"))
    return rows


if __name__ == "__main__":
    main()
