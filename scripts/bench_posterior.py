"""Posterior by predictive resampling, for every checkpoint a fidelity benchmark kept: the law of
``p_{n+H}`` of each trained model against the exact Pólya-urn law at the same ``H`` (DESIGN.md
section 5), median over seeds, unconstrained and constrained side by side.

    .venv/bin/python scripts/bench_fidelity.py --tasks coin dirichlet --steps 3000 --keep runs/
    .venv/bin/python scripts/bench_posterior.py runs/                 # every coin/dirichlet/mixture run there
    .venv/bin/python scripts/bench_posterior.py runs/ --write-docs    # also update docs/results.md
    .venv/bin/python scripts/bench_posterior.py --tiny                # trains a tiny checkpoint first (smoke run)

``runs/`` holds one folder per run, ``<task>-<run>-<seed>/checkpoints/last.ckpt`` (the layout
``bench_fidelity.py --keep`` writes).  Each checkpoint goes through
``bayestrain.evaluate.evaluate_posterior`` (what ``bayestrain-eval posterior=true`` runs), which
writes ``posterior.png`` and ``posterior_metrics.json`` into ``<run>/posterior/``.  The same
contexts (``--seed``) are used for every checkpoint of a task.  Goals (issue 7): a constrained
model's W1 within 0.01 of the exact law (the worst coordinate), and its 90% intervals covering
the true parameter within 2 points of the exact law's coverage.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from bayestrain.report import update_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results.md"
W1_GOAL, COVER_GOAL = 0.01, 0.02
RUN_DIR = re.compile(r"^(?P<task>coin|dirichlet|mixture)-(?P<run>.+)-(?P<seed>\d+)$")


def find_runs(folder: Path, tasks: list[str] | None) -> dict[tuple[str, str], list[tuple[int, Path]]]:
    """``{(task, run): [(seed, last.ckpt), ...]}`` under ``folder``."""
    found: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = RUN_DIR.match(d.name)
        ckpt = d / "checkpoints" / "last.ckpt"
        if m is None or not ckpt.is_file() or (tasks and m["task"] not in tasks):
            continue
        found.setdefault((m["task"], m["run"]), []).append((int(m["seed"]), ckpt))
    return found


def reused(path: Path, args) -> dict | None:
    """A run's earlier ``posterior_metrics.json`` when it was computed with these settings."""
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    same = (s.get("n") == args.n and s.get("num_samples") == args.samples and s.get("num_contexts") == args.contexts
            and s.get("seed") == args.seed and (args.horizon is None or s.get("horizon") == args.horizon))
    return s if same else None


def fmt(v: float) -> str:
    return f"{v:.4f}" if v == v else "-"


def fmt_cover(v: float) -> str:
    return f"{v:.3f}" if v == v else "-"


def table(rows: dict[tuple[str, str], dict]) -> str:
    head = ("| task | run | seeds | W1 mean coord | W1 worst coord | W1 floor | cover 50% (exact) "
            "| cover 80% (exact) | cover 90% (exact) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (task, run), r in rows.items():
        cover = [f"{fmt_cover(r[f'coverage{lv}'])} ({fmt_cover(r[f'coverage{lv}_exact'])})" for lv in (50, 80, 90)]
        lines.append(f"| {task} | {run} | {r['seeds']} | {fmt(r['w1'])} | {fmt(r['w1_max_coord'])} | "
                     f"{fmt(r.get('w1_floor', float('nan')))} | " + " | ".join(cover) + " |")
    return "\n".join(lines)


def goals(rows: dict[tuple[str, str], dict]) -> list[str]:
    out = []
    for (task, run), r in rows.items():
        if run == "none":
            continue
        w1_ok = r["w1_max_coord"] <= W1_GOAL
        gap = abs(r["coverage90"] - r["coverage90_exact"])
        cov_ok = gap <= COVER_GOAL
        out.append(f"{'met   ' if w1_ok else 'MISSED'}  {task}/{run}: W1 (worst coordinate) "
                   f"{r['w1_max_coord']:.4f} (goal <= {W1_GOAL})")
        out.append(f"{'met   ' if cov_ok else 'MISSED'}  {task}/{run}: 90% coverage {r['coverage90']:.3f} vs exact "
                   f"{r['coverage90_exact']:.3f} ({100 * gap:.1f} points; goal <= {100 * COVER_GOAL:.0f})")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", type=Path, help="a bench_fidelity.py --keep folder")
    ap.add_argument("--tasks", nargs="+", default=None, choices=["coin", "dirichlet", "mixture"])
    ap.add_argument("--n", type=int, default=8, help="context length")
    ap.add_argument("--horizon", type=int, default=None, help="H (default: up to the trained length)")
    ap.add_argument("--samples", type=int, default=1000, help="S rolls per context")
    ap.add_argument("--contexts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="draws the contexts and the rolls")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a run's posterior/posterior_metrics.json computed with the same settings")
    ap.add_argument("--tiny", action="store_true", help="few contexts and rolls; trains a tiny run if no folder")
    ap.add_argument("--write-docs", action="store_true", help=f"update the posterior section of {DOCS}")
    ap.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    ap.add_argument("--docs-key", default="bench_posterior", help="the docs section to replace")
    args = ap.parse_args(argv)
    import torch

    from bayestrain.evaluate import evaluate_posterior

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.runs
        if args.tiny:
            args.n, args.samples, args.contexts = min(args.n, 2), min(args.samples, 32), min(args.contexts, 8)
            if folder is None:  # a tiny coin run, trained here
                sys.path.insert(0, str(ROOT / "scripts"))
                import bench_fidelity

                folder = Path(tmp)
                bench_fidelity.main(["--tiny", "--tasks", "coin", "--keep", str(folder)])
        if folder is None:
            ap.error("give the folder of a bench_fidelity.py --keep run (or --tiny)")
        if not folder.is_dir():
            ap.error(f"runs folder {folder} does not exist; train with scripts/bench_fidelity.py --keep {folder}")
        found = find_runs(folder, args.tasks)
        if not found:
            ap.error(f"no <task>-<run>-<seed>/checkpoints/last.ckpt for coin, dirichlet or mixture under {folder}")
        rows: dict[tuple[str, str], dict] = {}
        horizons = set()
        for (task, run), seeds in found.items():
            per_seed = []
            for seed, ckpt in sorted(seeds):
                print(f"[{task}/{run} seed {seed}] {ckpt}", file=sys.stderr, flush=True)
                out = ckpt.parent.parent / "posterior"
                out.mkdir(exist_ok=True)
                summary = reused(out / "posterior_metrics.json", args) if args.reuse else None
                if summary is None:
                    evaluate_posterior(str(ckpt), n=args.n, horizon=args.horizon, num_samples=args.samples,
                                       num_contexts=args.contexts, output_dir=out, seed=args.seed, device="cpu")
                    summary = json.loads((out / "posterior_metrics.json").read_text())
                horizons.add(summary["horizon"])
                per_seed.append({k: v for k, v in summary.items() if isinstance(v, float)})
            keys = per_seed[0].keys()
            rows[(task, run)] = {k: statistics.median(s[k] for s in per_seed) for k in keys}
            rows[(task, run)]["seeds"] = len(per_seed)
    title = (f"Law of p_(n+H), n = {args.n}, H = {', '.join(map(str, sorted(horizons)))}, S = {args.samples} rolls "
             f"from each of {args.contexts} contexts; median over seeds")
    tab = table(rows)
    goal_lines = goals(rows)
    print(title, "", tab, *goal_lines, sep="\n")
    if args.write_docs:
        cmd = "python scripts/bench_posterior.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join([
            "## Posterior by predictive resampling (`scripts/bench_posterior.py`)", "",
            f"Command: `{cmd.strip()}`  ", f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}.",
            "", title + ". W1: per coordinate (coin: the success coordinate), mean over contexts; the floor is "
            "the expected W1 of a perfect sampler with the same S (Monte Carlo error). Coverage: how often "
            "the true theta falls in the model's central interval (in brackets: the exact law's).", "",
            tab, "", *[f"- {g}" for g in goal_lines]])
        update_docs(args.docs, args.docs_key, text)
        print(f"written: {args.docs}")
    return rows


if __name__ == "__main__":
    main()
