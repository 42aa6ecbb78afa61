"""Each benchmark script runs in a tiny configuration, in-process, and prints its table."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_fidelity_tiny_prints_its_table_and_writes_docs(tmp_path, capsys):
    bench = load("bench_fidelity")
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nintro\n")
    results = bench.main(["--tiny", "--tasks", "coin", "markov", "--write-docs", "--docs", str(docs)])
    out = capsys.readouterr().out
    assert "| task | run | steps to 0.01 | steps to 0.001 | final gap (bits/tok) |" in out
    for row in ("| coin | none |", "| coin | sequence |", "| markov | none |", "| markov | block |"):
        assert row in out, row
    coin = results["coin"]["sequence"]
    assert math.isfinite(coin["final_gap"]) and "violation/martingale" in coin and "violation/exchangeability" in coin
    assert "violation/reversibility" in results["markov"]["block"]  # the block-level conditions apply there
    assert coin["curves"][0][-1][0] == 4  # the last validation follows the last step
    text = docs.read_text()
    assert text.startswith("# Results\n\nintro") and "<!-- bench_fidelity:start -->" in text
    assert "Command: `python scripts/bench_fidelity.py --tiny" in text and "| coin | sequence |" in text
    bench.update_docs(docs, "bench_fidelity", "replaced")  # a rerun replaces its section only
    assert docs.read_text().count("bench_fidelity:start") == 1 and "replaced" in docs.read_text()


def test_steps_to_threshold_reads_the_validation_curve():
    bench = load("bench_fidelity")
    curve = [(100, 0.05), (200, 0.009), (300, 0.002), (400, 0.0009)]
    assert bench.steps_to(curve, 1e-2) == 200 and bench.steps_to(curve, 1e-3) == 400
    assert math.isinf(bench.steps_to(curve, 1e-4)) and bench.fmt(math.inf, 400) == ">400"


def test_bench_overhead_tiny_prints_its_table(capsys):
    bench = load("bench_overhead")
    rows = bench.main(["--tiny", "--only", "set: projection (reversibility)"])  # its baseline comes along
    names = ["none", "set: none", "set: projection (reversibility)"]  # every condition trains in test_train.py
    out = capsys.readouterr().out
    assert "| configuration | ms/step (median) | ratio (paired median) | vs |" in out
    for name in names:
        assert f"| {name} |" in out, name
        assert rows[name]["ms"] > 0
    assert f"| {bench.PLAIN} |" in out and rows["none"]["ratio_vs_plain"] > 0
    assert rows["set: projection (reversibility)"]["baseline"] == "set: none"


def test_bench_posterior_tiny_prints_its_table_with_goal_checks(tmp_path, capsys):
    bench = load("bench_posterior")
    docs = tmp_path / "results.md"
    rows = bench.main(["--tiny", "--write-docs", "--docs", str(docs)])  # trains coin none/sequence first
    out = capsys.readouterr().out
    assert "| task | run | seeds | W1 mean coord | W1 worst coord |" in out
    assert set(rows) == {("coin", "none"), ("coin", "sequence")}
    for r in rows.values():
        assert 0 < r["w1"] <= r["w1_max_coord"] and 0 <= r["coverage90"] <= 1 and 0 <= r["coverage90_exact"] <= 1
    # goal lines for the constrained run only, each either met or MISSED
    goal_lines = [ln for ln in out.splitlines() if ln.startswith(("met", "MISSED"))]
    assert len(goal_lines) == 2 and all("coin/sequence" in ln for ln in goal_lines)
    assert "<!-- bench_posterior:start -->" in docs.read_text()


def test_bench_posterior_refuses_a_folder_without_runs(tmp_path):
    bench = load("bench_posterior")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])


@pytest.mark.parametrize("script", ["bench_fidelity", "bench_overhead", "bench_posterior"])
def test_scripts_have_a_tiny_mode(script):
    assert "--tiny" in (SCRIPTS / f"{script}.py").read_text()


def test_projection_mode_diagnostics_run_only_on_logging_steps(monkeypatch):
    """The module's projection-mode violations (a diagnostic: the projection enforces the
    condition) are evaluated on the first step and the steps whose values reach the logger,
    without autograd; the projection itself runs after every optimizer step."""
    import lightning.pytorch as pl
    import torch

    from bayestrain.conditions import Reversibility
    from bayestrain.model import BayesTransformer
    from bayestrain.module import BayesLitModule
    from bayestrain.tasks import Dirichlet

    cond = Reversibility(mode="projection")
    calls, projections = [], []
    violation, project = cond.violation, cond.project_

    def counting_violation(inp, training):
        calls.append((training, torch.is_grad_enabled()))
        return violation(inp, training)

    monkeypatch.setattr(cond, "violation", counting_violation)
    monkeypatch.setattr(cond, "project_", lambda model: (projections.append(1), project(model)))
    task = Dirichlet(3)
    model = BayesTransformer(3, d_model=16, n_layers=1, n_heads=2, max_len=16, layout="set", pos_encoding="none")
    module = BayesLitModule(model, task, {"reversibility": cond}, monitor_sequence_conditions=False)
    batches = [task.sample(4, 6, torch.Generator().manual_seed(i)) for i in range(6)]
    trainer = pl.Trainer(max_steps=6, log_every_n_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert calls == [(True, False)] * 3, calls  # steps 0, 2 and 5 (log_every_n_steps=3), no autograd
    assert len(projections) == 6
    assert "train/violation/reversibility_epoch" in trainer.callback_metrics
