"""The side-by-side scripts run in a tiny configuration and print their tables."""
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_sinkhorn_cpu_tiny(capsys):
    out = load("bench_sinkhorn_cpu").main(["--tiny"])
    for prior, res in out["residuals"].items():
        assert res[-1] < 1e-6 * res[1], (prior, res)  # geometric convergence to the prior
    assert set(out["ms"]) >= {"softmax (SDPA)", "sinkhorn n_iters=3"}
    assert "x softmax" in capsys.readouterr().out


def test_compare_conditions_tiny(capsys):
    rows = load("compare_conditions").main(["--steps", "2", "--tiny"])
    assert list(rows)[-1] == "exact Bayes" and len(rows) == 3
    assert rows["exact Bayes"]["bayes_gap_bits"] < 1e-9
    assert "bayes gap" in capsys.readouterr().out


def test_bench_scale_tiny(capsys):
    out = load("bench_scale").main(["--tiny"])
    assert set(out["throughput"]) == {"1 process", "DDP 2 processes (ddp_spawn, gloo)"}
    assert all(r > 0 for r in out["throughput"].values()) and out["save_ms"] > 0
    assert "x 1 process" in capsys.readouterr().out
