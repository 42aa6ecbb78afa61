"""Bayes fidelity benchmark: unconstrained and constrained training side by side on each wind
tunnel, same budget and seeds; steps to reach a bayes gap of 1e-2 and 1e-3 bits/token, the
final gap, each violation and ECE, median over seeds.

    .venv/bin/python scripts/bench_fidelity.py                          # 2000 steps, 3 seeds, all tasks
    .venv/bin/python scripts/bench_fidelity.py --steps 4000 --tasks dirichlet coin
    .venv/bin/python scripts/bench_fidelity.py --write-docs             # also update docs/results.md
    .venv/bin/python scripts/bench_fidelity.py --tiny                   # seconds-long smoke run

Every run is ``train(cfg)`` on the real Hydra config composed with the overrides shown in the
table, plus the shared budget (``trainer.max_steps``, ``trainer.val_check_interval``, one
epoch, ``seed``) and a CSV logger in a temporary folder; the steps-to-threshold are read from
``val/bayes_gap_bits`` at each validation (``metrics.csv``), the final numbers from the last
validation.  The violations are the validation monitors' (full evaluation definitions).

Runs per task (``--runs`` replaces them for every task, ``name:override,override``):

- coin, dirichlet, mixture: ``none`` (``condition=none``) against ``sequence`` (the default
  penalties, ``condition=sequence``) on the default causal model;
- markov (not exchangeable, so the sequence conditions refuse it): ``none`` against ``block``
  on the same bidirectional RoPE model, unconstrained (softmax, untied W_Q, W_K; the block-level
  conditions only measured) and constrained (Sinkhorn attention and tied W_Q = W_K:
  ``condition=block``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bayestrain.report import quiet_lightning, update_docs
from bayestrain.train import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = ROOT / "docs" / "results.md"
THRESHOLDS = (1e-2, 1e-3)

EXCHANGEABLE = [("none", ["condition=none"]), ("sequence", ["condition=sequence"])]
BIDIR = ["model=bidirectional_tied", "data.val_batch_size=16"]
RUNS: dict[str, list[tuple[str, list[str]]]] = {
    "coin": EXCHANGEABLE,
    "dirichlet": EXCHANGEABLE,
    "mixture": EXCHANGEABLE,
    # the unconstrained markov model measures the block-level conditions (never trains on them)
    "markov": [("none", [*BIDIR, "model.tied_qk=false", "condition=block", "condition.prior_consistency.mode=measure",
                         "condition.reversibility.mode=measure"]),
               ("block", [*BIDIR, "model.attention=sinkhorn", "condition=block"])],
}
CONSTRAINED = {"sequence", "block"}
TINY = ["data.batch_size=8", "data.seq_len=8", "data.val_size=16", "model.d_model=16", "model.n_layers=1",
        "model.n_heads=2"]


def gap_curve(out: Path, val_every: int) -> list[tuple[int, float]]:
    """``(step, val/bayes_gap_bits)`` at every validation, from the run's CSV log.  The runs are
    one epoch long, so the ``i``-th validation (in logged order) follows training step
    ``(i + 1) * val_every`` (Lightning logs it under the step counter before it advances)."""
    rows = []
    for f in sorted(out.rglob("metrics.csv")):
        for row in csv.DictReader(open(f)):
            v = row.get("val/bayes_gap_bits")
            if v not in (None, ""):
                rows.append((int(row["step"]), float(v)))
    return [((i + 1) * val_every, g) for i, (_, g) in enumerate(sorted(rows))]


def steps_to(curve: list[tuple[int, float]], threshold: float) -> float:
    """The first validated step with a gap <= threshold (``inf``: never within the budget)."""
    return next((float(s) for s, g in curve if g <= threshold), math.inf)


def one_run(task: str, name: str, overrides: list[str], seed: int, budget: list[str], out: Path,
            val_every: int) -> dict:
    from bayestrain.train import train

    cfg = compose_config([f"task={task}", *overrides, *budget, f"seed={seed}"], out)
    start = time.perf_counter()
    result = train(cfg)
    secs = time.perf_counter() - start
    val = result["val"]
    curve = gap_curve(out, val_every)
    row = {"seconds": secs, "final_gap": val.get("val/bayes_gap_bits", math.nan), "ece": val.get("val/ece", math.nan),
           "nll": val.get("val/nll", math.nan), "curve": curve}
    for t in THRESHOLDS:
        row[f"steps_{t:g}"] = steps_to(curve, t)
    for k, v in val.items():
        if k.startswith("val/violation/"):
            row[k[len("val/"):]] = v
    return row


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else math.nan


def fmt(v: float, steps: int | None = None) -> str:
    if steps is not None:
        return f">{steps}" if math.isinf(v) else f"{v:.0f}"
    if v != v:
        return "-"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.4f}"


def aggregate(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r if k not in ("curve",)}
    return {k: median([r.get(k, math.nan) for r in runs]) for k in keys}


def table(results: dict, steps: int, seeds: list[int], overrides_of: dict) -> str:
    viol = sorted({k for rows in results.values() for agg in rows.values() for k in agg if k.startswith("violation/")})
    head = ["task", "run", *[f"steps to {t:g}" for t in THRESHOLDS], "final gap (bits/tok)",
            *[v.split("/", 1)[1] for v in viol], "ECE", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for task, rows in results.items():
        for name, agg in rows.items():
            cells = [task, name] + [fmt(agg[f"steps_{t:g}"], steps) for t in THRESHOLDS]
            cells += [fmt(agg["final_gap"])] + [fmt(agg.get(v, math.nan)) for v in viol]
            cells += [fmt(agg["ece"]), f"{agg['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median over seeds {seeds}; budget {steps} steps per run. Violations: validation "
                 "monitors under their full definitions (exchangeability: nats/observation; martingale: "
                 "KL, nats; prior_consistency: KL, nats; reversibility: in [0, 1]); '-' = does not apply.")
    lines.append("Runs: " + "; ".join(f"`{task}/{name}`: `{' '.join(ov)}`" for (task, name), ov in overrides_of.items()))
    return "\n".join(lines)


def goals(results: dict, steps: int) -> list[str]:
    """Issue 7's fidelity goals, for every constrained run on dirichlet against ``none``."""
    out = []
    d = results.get("dirichlet", {})
    a = d.get("none")
    for name, b in d.items():
        if a is None or name == "none":
            continue
        sa, sb = a["steps_0.001"], b["steps_0.001"]
        met = sb < sa
        out.append(f"{'met ' if met else 'MISSED'}  dirichlet/{name}: reaches 1e-3 bits/token in "
                   f"{fmt(sb, steps)} steps vs unconstrained {fmt(sa, steps)}")
        for k in sorted(k for k in b if k.startswith("violation/")):
            if k in a and b[k] == b[k] and a[k] == a[k]:
                ratio = abs(a[k]) / max(abs(b[k]), 1e-30)
                out.append(f"{'met ' if ratio >= 10 else 'MISSED'}  dirichlet/{name}: {k} {fmt(a[k])} -> {fmt(b[k])} "
                           f"({ratio:.1f} x lower; goal >= 10 x)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--val-size", type=int, default=256)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=None, help="name:override,override (replaces the per-task runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--tiny", action="store_true", help="tiny model and data, 4 steps, one seed (smoke test)")
    ap.add_argument("--write-docs", action="store_true", help=f"update the bench_fidelity section of {DOCS}")
    ap.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders (checkpoints, CSV logs) here")
    ap.add_argument("--docs-key", default="bench_fidelity", help="the docs section to replace")
    ap.add_argument("--save", type=Path, default=None, help="also write the per-task numbers (and gap curves) as JSON")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    extra = list(args.overrides)
    if args.tiny:
        extra = TINY + extra
        args.steps, args.val_every = min(args.steps, 4), min(args.val_every, 4)
        args.seeds = args.seeds[:1] if argv is None or "--seeds" not in argv else args.seeds
        args.val_size = min(args.val_size, 16)
    if args.steps % args.val_every:
        ap.error(f"--steps ({args.steps}) must be a multiple of --val-every ({args.val_every})")
    budget = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.val_every}",
              f"data.train_batches_per_epoch={args.steps}", f"data.val_size={args.val_size}",
              "trainer.log_every_n_steps=50", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
              "logger=csv", "callbacks.progress=null", "callbacks.reliability=null",
              "summary=false", *extra]
    results, overrides_of = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        for task in args.tasks:
            runs = RUNS[task]
            if args.runs:
                runs = [(s.partition(":")[0], [o for o in s.partition(":")[2].split(",") if o]) for s in args.runs]
            results[task] = {}
            for name, overrides in runs:
                overrides_of[(task, name)] = overrides
                per_seed = []
                for seed in args.seeds:
                    out = Path(tmp) / f"{task}-{name}-{seed}"
                    per_seed.append(one_run(task, name, overrides, seed, budget, out, args.val_every))
                    r = per_seed[-1]
                    print(f"[{task}/{name} seed {seed}] {r['seconds']:.0f}s final gap {fmt(r['final_gap'])} "
                          f"steps to 1e-2 {fmt(r['steps_0.01'], args.steps)} to 1e-3 {fmt(r['steps_0.001'], args.steps)}",
                          file=sys.stderr, flush=True)
                results[task][name] = aggregate(per_seed)
                results[task][name]["curves"] = [r["curve"] for r in per_seed]
    title = (f"Bayes fidelity: {args.steps} steps, validation every {args.val_every} steps on {args.val_size} "
             f"sequences, seeds {args.seeds}{', tiny' if args.tiny else ''}")
    tab = table({t: {n: {k: v for k, v in a.items() if k != 'curves'} for n, a in rows.items()}
                 for t, rows in results.items()}, args.steps, args.seeds, overrides_of)
    print(title)
    print()
    print(tab)
    goal_lines = goals(results, args.steps)
    for line in goal_lines:
        print(line)
    if args.save:
        import json

        args.save.write_text(json.dumps({t: {n: a for n, a in rows.items()} for t, rows in results.items()},
                                        indent=1, default=str))
    if args.write_docs:
        cmd = "python scripts/bench_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        date = datetime.date.today().isoformat()
        heading = f"## Bayes fidelity: {', '.join(args.tasks)}, {args.steps} steps (`scripts/bench_fidelity.py`)"
        text = "\n".join([heading, "",
                          f"Command: `{cmd.strip()}`  ", f"Date: {date}; torch {torch.__version__}, "
                          f"{torch.get_num_threads()} CPU threads.", "", title + ".", "", tab, "",
                          *[f"- {g}" for g in goal_lines]])
        update_docs(args.docs, args.docs_key, text)
        print(f"written: {args.docs}")
    return results


if __name__ == "__main__":
    main()
