"""Fidelity report of a trained predictor: how close it is to a Bayes process.

For a model and a wind tunnel, on a set of sequences:

- the **bayes gap per position** ``t`` (``KL(p_exact || p_model) / ln 2`` at each context length,
  mean over sequences), the summary metrics beside the exact Bayes predictor's;
- **each violation**: the sequence-level ones (exchangeability, martingale) for the model as a
  whole, under their full evaluation definitions; the block-level ones **per layer and head**
  from ``model(x, return_attn="weights")``: prior consistency ``KL(pi || mu)`` (prior
  ``causal_uniform`` for causal models, ``uniform`` or the model's fixed Sinkhorn prior
  otherwise) and, for ``set`` / ``bidirectional`` models, reversibility (detailed balance);
  the Sinkhorn residual per head where the model uses Sinkhorn attention;
- the **reliability diagram**.

Written as ``report.md`` plus PNGs (and ``fidelity.json``) into a folder, and logged to W&B
when a run is active.  Entry points: :func:`fidelity_report` (a function of built objects),
``bayestrain-eval ckpt_path=... report=true`` and the Lightning callback
:class:`FidelityReportCallback`, which writes the report into the run folder at the end of
training::

    bayestrain-train +callbacks.fidelity._target_=bayestrain.fidelity.FidelityReportCallback \\
        +callbacks.fidelity.dirpath='${paths.output_dir}/fidelity'
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bayes_gap_per_position",
    "attention_violations",
    "fidelity_report",
    "gap_figure",
    "head_figure",
    "FidelityReportCallback",
]


# ----------------------------------------------------------------------------- numbers
@torch.no_grad()
def bayes_gap_per_position(model_logp: Tensor, exact_probs: Tensor) -> Tensor:
    """``KL(p_exact || p_model) / ln 2`` at each position ``t``, mean over the batch: ``[T]``
    float64 (both renormalised in float64, as ``bayestrain.metrics.bayes_gap_bits``)."""
    lq = model_logp.double()
    lq = lq - lq.logsumexp(-1, keepdim=True)
    p = exact_probs.double()
    p = p / p.sum(-1, keepdim=True)
    term = torch.where(p > 0, p * (p.log() - lq), torch.zeros((), dtype=p.dtype, device=p.device))
    return (term.sum(-1) / math.log(2)).mean(0)


def _prior_for(model, trace):
    """The prior the block-level check uses for this model: ``causal_uniform`` for causal
    models; the model's fixed Sinkhorn prior conditioned on the visible keys; else uniform."""
    if trace.layout == "causal":
        return "causal_uniform"
    log_prior = getattr(model, "log_prior", None)
    if log_prior is None:
        return "uniform"
    K = trace[0].shape[-1]
    w = log_prior[:K].detach().double().exp()[None] * trace.key_mask.double()
    return w / w.sum(-1, keepdim=True)


@torch.no_grad()
def attention_violations(model, x: Tensor, max_sequences: int | None = None) -> list[dict]:
    """Block-level violations per layer and head from ``model(x, return_attn="weights")``.

    Returns one dict per ``(layer, head)``: ``prior_consistency`` (``KL(pi || mu)``, nats),
    ``prior_consistency_tv``, ``reversibility`` (set / bidirectional layouts only, else
    ``None``) and ``sinkhorn_residual`` (Sinkhorn models only, else ``None``), each averaged over
    the sequences (and, for set / bidirectional models, over their context lengths).  An empty
    list for a predictor without attention read-outs."""
    from bayestrain.conditions import prior_consistency_violation, reversibility_violation

    if max_sequences is not None:
        x = x[:max_sequences]
    try:
        _, trace = model(x, return_attn="weights")
    except TypeError:
        return []
    prior = _prior_for(model, trace)
    rho = trace.log_rho.exp() if trace.log_rho is not None else None
    rows = []
    for layer, attn in enumerate(trace):
        for h in range(attn.shape[1]):
            a = attn[:, h : h + 1]
            pc = prior_consistency_violation(a, prior=prior, query_weights=rho, key_mask=trace.key_mask)
            rev = None
            if trace.layout != "causal":
                rev = float(reversibility_violation(a, key_mask=trace.key_mask).value)
            res = None
            if len(trace.residuals) > layer:
                res = float(trace.residuals[layer][:, h].double().mean())
            rows.append({"layer": layer, "head": h, "prior_consistency": float(pc.value),
                         "prior_consistency_tv": float(pc.extras["tv"]), "reversibility": rev,
                         "sinkhorn_residual": res})
    return rows


# ----------------------------------------------------------------------------- figures
def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def gap_figure(gap: Tensor | np.ndarray, title: str = "Bayes gap per position"):
    """The bayes gap (bits) against the context length ``t`` (log scale), with the 1e-2 and 1e-3
    bits/token reference lines.  A ``matplotlib.figure.Figure`` (Agg, no pyplot)."""
    g = np.asarray(gap.cpu() if isinstance(gap, Tensor) else gap, dtype=np.float64)
    fig = _figure((6.0, 3.6))
    ax = fig.subplots()
    t = np.arange(len(g))
    ax.plot(t, np.maximum(g, 1e-12), marker="o", markersize=3, color="tab:blue", label="model")
    for level, style in ((1e-2, "--"), (1e-3, ":")):
        ax.axhline(level, color="0.5", linestyle=style, linewidth=1, label=f"{level:g} bits/token")
    ax.set_yscale("log")
    ax.set_xlabel("context length t (observations seen)")
    ax.set_ylabel("KL(p_exact || p_model) (bits)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def head_figure(rows: list[dict], title: str = "Block-level violations per layer and head"):
    """One heat map (layers x heads) per block-level violation present in ``rows``."""
    keys = [k for k in ("prior_consistency", "reversibility", "sinkhorn_residual")
            if rows and rows[0].get(k) is not None]
    n_layers = 1 + max(r["layer"] for r in rows)
    n_heads = 1 + max(r["head"] for r in rows)
    fig = _figure((3.2 * len(keys) + 0.6, 0.9 * n_layers + 1.6))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        m = np.full((n_layers, n_heads), np.nan)
        for r in rows:
            m[r["layer"], r["head"]] = r[key]
        im = ax.imshow(m, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", color="w", fontsize="small")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(key, fontsize="medium")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- report
def _fmt(v) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def _default_monitors(task) -> dict:
    from bayestrain.conditions import Exchangeability, Martingale

    if not getattr(task, "exchangeable", False):
        return {}
    return {"exchangeability": Exchangeability(mode="measure"), "martingale": Martingale(mode="measure")}


def _wandb_run(run=None):
    if run is not None:
        return run
    wandb = sys.modules.get("wandb")  # a W&B run can only be active if wandb was imported
    return getattr(wandb, "run", None) if wandb is not None else None


@torch.no_grad()
def fidelity_report(
    model,
    task,
    x: Tensor,
    out_dir: str | Path,
    conditions: dict | None = None,
    seed: int = 0,
    batch_size: int = 64,
    title: str | None = None,
    posterior=None,
    wandb_run=None,
    command: str | None = None,
) -> dict:
    """Write the fidelity report of ``model`` on the sequences ``x: [N, T]`` into ``out_dir``.

    Args:
        model: the predictor (``BayesTransformer``; any predictor works for the sequence-level
            parts, block-level rows need ``model(x, return_attn="weights")``).
        task: the wind tunnel (exact predictive, exchangeability).  ``None``: no bayes gap.
        x: evaluation sequences (e.g. the validation set), evaluated in batches.
        conditions: ``{name: Condition}`` measured under their full (evaluation) definitions;
            default: exchangeability and martingale for exchangeable tasks.
        posterior: an optional ``PosteriorComparison`` (``bayestrain.resampling``) to include.
        wandb_run: a W&B run to log to; default the active one (``wandb.run``), if any.

    Returns:
        the numbers, also written as ``fidelity.json``: ``summary`` (model and exact Bayes),
        ``gap_per_position``, ``heads``, ``files``.
    """
    from bayestrain.module import Evaluator
    from bayestrain.plots import reliability_diagram, save_figure
    from bayestrain.tasks import BayesPredictor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device if hasattr(model, "parameters") else x.device
    x = x.to(device)
    conditions = _default_monitors(task) if conditions is None else dict(conditions)
    vocab = getattr(model, "vocab_size", None) or task.vocab_size
    has_exact = task is not None and hasattr(task, "posterior_predictive")

    # summary metrics (model beside the exact predictor) and the gap per position
    predictors = {"model": (model, conditions)}
    if has_exact:
        predictors["exact Bayes"] = (BayesPredictor(task), {n: c for n, c in conditions.items() if c.needs_attn is None})
    summary, bins, gap_sum, count = {}, None, None, 0
    for name, (predictor, conds) in predictors.items():
        ev = Evaluator(vocab, task, conds).to(device)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            logp = predictor(xb)
            ev.update(predictor, xb, logp=logp, generator=torch.Generator(device=device).manual_seed(seed + i))
            if name == "model" and has_exact:
                g = bayes_gap_per_position(logp, task.posterior_predictive(xb).to(device)) * xb.shape[0]
                gap_sum = g if gap_sum is None else gap_sum + g
                count += xb.shape[0]
        summary[name] = {k: float(v) for k, v in ev.compute().items()}
        if name == "model":
            bins = ev.calibration.reliability.compute()
    gap = (gap_sum / count).cpu() if gap_sum is not None else None
    heads = attention_violations(model, x[:batch_size])

    # figures
    files = {}
    name = title or f"{type(model).__name__} on {type(task).__name__ if task is not None else 'data'}"
    figs = {"reliability": reliability_diagram(bins, title="reliability")}
    if gap is not None:
        figs["bayes_gap_per_position"] = gap_figure(gap)
    if heads:
        figs["violations_per_head"] = head_figure(heads)
    if posterior is not None:
        from bayestrain.resampling import posterior_figure

        figs["posterior"] = posterior_figure(posterior)
    for key, fig in figs.items():
        files[key] = save_figure(fig, out / f"{key}.png").name

    # markdown
    md = [f"# Fidelity report: {name}", ""]
    md.append(f"{x.shape[0]} sequences of length {x.shape[1]}; written "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}.")
    if command:
        md += ["", f"Command: `{command}`"]
    keys = ["bayes_gap_bits", "nll", "ece", "mce", "brier", "acc"]
    keys = [k for k in keys if any(k in r for r in summary.values())]
    keys += sorted({k for r in summary.values() for k in r if k.startswith("violation/")})
    md += ["", "## Summary", "", "| predictor | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for pred, row in summary.items():
        md.append(f"| {pred} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    md += ["", "Violations: sequence-level ones under their full evaluation definitions "
           "(exchangeability in nats per observation, martingale KL in nats)."]
    if gap is not None:
        md += ["", "## Bayes gap per position", "", f"![bayes gap per position]({files['bayes_gap_per_position']})",
               "", "| t | gap (bits) |", "|---:|---:|"]
        md += [f"| {t} | {_fmt(v)} |" for t, v in enumerate(gap.tolist())]
    md += ["", "## Block-level violations per layer and head", ""]
    if heads:
        md += [f"![violations per head]({files['violations_per_head']})", "",
               "| layer | head | prior consistency KL (nats) | TV | reversibility | Sinkhorn residual |",
               "|---:|---:|---:|---:|---:|---:|"]
        for r in heads:
            md.append(f"| {r['layer']} | {r['head']} | {_fmt(r['prior_consistency'])} | "
                      f"{_fmt(r['prior_consistency_tv'])} | {_fmt(r['reversibility'])} | {_fmt(r['sinkhorn_residual'])} |")
        layout = getattr(model, "layout", "?")
        md += ["", f"Layout `{layout}`: prior `{'causal_uniform' if layout == 'causal' else 'uniform or the model prior'}`"
               + ("; reversibility does not apply under a causal mask (the stationary law is a point mass)."
                  if layout == "causal" else ".")]
    else:
        md.append("The predictor has no attention read-outs (`model(x, return_attn='weights')`).")
    md += ["", "## Reliability", "", f"![reliability]({files['reliability']})"]
    if posterior is not None:
        md += ["", "## Posterior by predictive resampling", "", "```", posterior.table(), "```", "",
               f"![posterior]({files['posterior']})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    files["report"] = "report.md"

    result = {"summary": summary, "gap_per_position": None if gap is None else gap.tolist(), "heads": heads,
              "files": files}
    if posterior is not None:
        result["posterior"] = posterior.summary()
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))

    run = _wandb_run(wandb_run)
    if run is not None:
        _log_wandb(run, result, figs)
    model.train(was_training)
    return result


def _log_wandb(run, result: dict, figs: dict) -> None:
    import wandb

    payload = {f"fidelity/{k}": wandb.Image(f) for k, f in figs.items()}
    for pred, row in result["summary"].items():
        tag = "model" if pred == "model" else "exact"
        payload.update({f"fidelity/{tag}/{k}": v for k, v in row.items()})
    if result["gap_per_position"] is not None:
        payload["fidelity/gap_per_position"] = wandb.Table(
            columns=["t", "gap_bits"], data=[[t, v] for t, v in enumerate(result["gap_per_position"])])
    if result["heads"]:
        cols = list(result["heads"][0])
        payload["fidelity/heads"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in result["heads"]])
    run.log(payload)


class FidelityReportCallback:
    """Lightning callback: the fidelity report of the trained model at the end of ``fit``, into
    ``dirpath`` (the run folder's ``fidelity/``), logged to the run's W&B logger if it has one.
    ``max_sequences`` validation sequences are used."""

    def __new__(cls, *args, **kwargs):
        import lightning.pytorch as pl

        class _Callback(pl.Callback):
            def __init__(self, dirpath: str, max_sequences: int = 256):
                self.dirpath, self.max_sequences = Path(dirpath), int(max_sequences)
                self.result: dict | None = None

            def on_fit_end(self, trainer, pl_module) -> None:
                if not trainer.is_global_zero:
                    return
                dm = trainer.datamodule
                x = getattr(dm, "val_x", None)
                if x is None:
                    return
                run = None
                for logger in trainer.loggers:
                    if type(logger).__name__ == "WandbLogger":
                        run = logger.experiment
                conds = getattr(getattr(pl_module, "val_eval", None), "conditions", None)
                self.result = fidelity_report(pl_module.model, pl_module.task, x[: self.max_sequences],
                                              self.dirpath, conditions=conds, seed=getattr(pl_module, "seed", 0),
                                              wandb_run=run)

        _Callback.__name__ = _Callback.__qualname__ = "FidelityReportCallback"
        return _Callback(*args, **kwargs)
