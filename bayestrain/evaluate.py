"""``python -m bayestrain.evaluate ckpt_path=...`` (console script ``bayestrain-eval``).

Rebuilds the run from the configuration stored in the checkpoint, recomputes the evaluation
metrics on the chosen split (beside the exact Bayes predictor for wind tunnels), prints the
table and writes the reliability diagram into the evaluation's run folder.

``posterior=true`` adds the posterior by predictive resampling (``bayestrain.resampling``): the
model is rolled forward ``posterior_h`` steps ``posterior_s`` times from ``posterior_contexts``
fresh contexts of length ``posterior_n`` and its law of ``p_{n+H}`` is compared with the exact
Polya-urn law (coin, dirichlet; the exact predictor resampled for mixture): Wasserstein-1 and
the coverage of the true theta by central 50/80/90% intervals, a table, ``posterior.png`` and
``posterior_metrics.json``.  ``report=true`` writes the fidelity report
(``bayestrain.fidelity``: Markdown plus PNGs) into ``fidelity/`` of the run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bayestrain.checkpoint import load_checkpoint

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _upgrade_config(cfg):
    """Configs saved before the ``scheduler`` group kept the classifier's schedule in
    ``module.warmup_steps`` / ``module.lr_schedule``: move them to the equivalent scheduler node
    (evaluation never steps it, but the module must build)."""
    module = cfg.get("module") or {}
    if "warmup_steps" in module or "lr_schedule" in module:
        from omegaconf import open_dict

        with open_dict(cfg):
            warmup = int(module.pop("warmup_steps", 0) or 0)
            decay = str(module.pop("lr_schedule", "linear"))
            if cfg.get("scheduler") is None:
                cfg.scheduler = {"_target_": "bayestrain.schedules.warmup_decay", "_partial_": True,
                                 "warmup_steps": warmup, "decay": decay, "final_ratio": 1.0 if decay == "constant" else 0.0}
    return cfg


def module_from_checkpoint(ckpt: dict):
    from bayestrain.train import build

    cfg = _upgrade_config(OmegaConf.create(ckpt["bayestrain_config"]))
    objs = build(cfg)
    module = objs["module"]
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), objs, cfg


def evaluate(ckpt_path: str, split: str = "val", max_batches: int | None = None, exact_baseline: bool = True,
             output_dir: str | Path = ".", seed: int = 0) -> dict:
    from bayestrain.module import Evaluator
    from bayestrain.plots import reliability_diagram, save_figure
    from bayestrain.report import summary_table
    from bayestrain.tasks import BayesPredictor

    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} must be 'val' or 'test'")
    module, objs, _ = module_from_checkpoint(load_checkpoint(ckpt_path))
    dm, task = objs["datamodule"], objs["task"]
    if hasattr(module, "evaluate_split"):  # modules that evaluate themselves (bayestrain.classifier)
        rows, bins = module.evaluate_split(dm, split, max_batches=max_batches)
        out_dir = Path(output_dir)
        save_figure(reliability_diagram(bins, title=f"{split} reliability"), out_dir / f"{split}_reliability.png")
        print(summary_table(rows, title=f"{Path(ckpt_path).name}: {split} split"))
        (out_dir / f"{split}_metrics.json").write_text(json.dumps(rows, indent=2))
        print(f"written: {out_dir / f'{split}_metrics.json'}, {out_dir / f'{split}_reliability.png'}")
        return rows
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    predictors = {"model": module.model}
    if exact_baseline and hasattr(task, "posterior_predictive"):
        predictors["exact Bayes"] = BayesPredictor(task)
    rows, out_dir = {}, Path(output_dir)
    for name, predictor in predictors.items():
        conds = module.val_eval.conditions
        if name != "model":  # the exact predictor has no attention read-outs
            conds = {n: c for n, c in conds.items() if c.needs_attn is None}
        ev = Evaluator(task.vocab_size, task, conds)
        for i, x in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            ev.update(predictor, x, generator=torch.Generator().manual_seed(seed + i))
        rows[name] = {k: float(v) for k, v in ev.compute().items()}
        if name == "model":
            fig = reliability_diagram(ev.calibration.reliability.compute(), title=f"{split} reliability")
            save_figure(fig, out_dir / f"{split}_reliability.png")
    print(summary_table(rows, title=f"{Path(ckpt_path).name}: {split} split"))
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"written: {out_dir / f'{split}_metrics.json'}, {out_dir / f'{split}_reliability.png'}")
    return rows


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_posterior(ckpt_path: str, n: int = 8, horizon: int | None = None, num_samples: int = 1000,
                       num_contexts: int = 256, output_dir: str | Path = ".", seed: int = 0, device: str = "auto"):
    """Posterior by predictive resampling of a checkpoint's model against the exact law of
    ``p_{n+H}`` (DESIGN.md section 5).  ``horizon=None``: up to the trained sequence length
    (``seq_len - 1 - n``), where the model has seen every position.  Prints the table, writes
    ``posterior.png`` and ``posterior_metrics.json``; returns the ``PosteriorComparison``."""
    import warnings

    from bayestrain.plots import save_figure
    from bayestrain.resampling import compare_posterior, posterior_figure

    module, objs, cfg = module_from_checkpoint(load_checkpoint(ckpt_path))
    task = objs["task"]
    if task is None or not hasattr(task, "sample"):
        raise ValueError("posterior=true needs a wind-tunnel task (coin, dirichlet, mixture): the exact law of "
                         "p_(n+H) and the true theta come from the task")
    data = cfg.get("data") or {}
    seq_len = int(data["seq_len"]) if "seq_len" in data else None
    if horizon is None:
        if seq_len is None:
            raise ValueError("posterior_h=null takes the horizon from data.seq_len, which this run has not; set posterior_h")
        horizon = seq_len - 1 - n
        if horizon < 1:
            raise ValueError(f"posterior_n={n} leaves no horizon within the trained length seq_len={seq_len}; "
                             "lower posterior_n or set posterior_h")
    elif seq_len is not None and n + horizon > seq_len - 1:
        warnings.warn(f"posterior_n + posterior_h = {n + horizon} goes past the trained sequence length "
                      f"(seq_len={seq_len}): the last {n + horizon - seq_len + 1} predictives are extrapolation",
                      stacklevel=2)
    model = module.model.to(_device(device))
    g = torch.Generator().manual_seed(seed)
    cmp = compare_posterior(model, task, n=n, horizon=horizon, num_samples=num_samples, num_contexts=num_contexts,
                            generator=g)
    print(cmp.table("model"))
    out_dir = Path(output_dir)
    save_figure(posterior_figure(cmp, title=f"{Path(ckpt_path).name}: law of p_(n+H), n={n}, H={horizon}"),
                out_dir / "posterior.png")
    summary = {"n": n, "horizon": horizon, "num_samples": num_samples, "num_contexts": num_contexts, "seed": seed,
               "reference": "exact Polya urn" if cmp.exact else "exact predictor, resampled", **cmp.summary()}
    (out_dir / "posterior_metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"written: {out_dir / 'posterior_metrics.json'}, {out_dir / 'posterior.png'}")
    return cmp


def evaluate_report(ckpt_path: str, output_dir: str | Path = ".", max_sequences: int = 256, seed: int = 0,
                    posterior=None, device: str = "auto") -> dict:
    """The fidelity report (``bayestrain.fidelity.fidelity_report``) of a checkpoint on the first
    ``max_sequences`` validation sequences, into ``{output_dir}/fidelity``."""
    from bayestrain.fidelity import fidelity_report

    module, objs, _ = module_from_checkpoint(load_checkpoint(ckpt_path))
    x = objs["datamodule"].val_x[:max_sequences]
    out = Path(output_dir) / "fidelity"
    result = fidelity_report(module.model.to(_device(device)), objs["task"], x, out,
                             conditions=module.val_eval.conditions, seed=seed, posterior=posterior,
                             title=Path(ckpt_path).name, command=f"bayestrain-eval ckpt_path={ckpt_path} report=true")
    print(f"written: {out / 'report.md'}")
    return result


# an absolute folder: console scripts (bayestrain-train/-eval) find conf/ as python -m does
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("export"):
        from bayestrain.checkpoint import export_safetensors

        print(f"exported the model weights to {export_safetensors(cfg.ckpt_path, cfg.export)}")
    evaluate(cfg.ckpt_path, cfg.split, cfg.max_batches, cfg.exact_baseline,
             HydraConfig.get().runtime.output_dir, cfg.seed)
    # posterior by predictive resampling, and the fidelity report (both off by default)
    out_dir, posterior = HydraConfig.get().runtime.output_dir, None
    if cfg.get("posterior", False):
        posterior = evaluate_posterior(cfg.ckpt_path, n=cfg.get("posterior_n", 8), horizon=cfg.get("posterior_h"),
                                       num_samples=cfg.get("posterior_s", 1000),
                                       num_contexts=cfg.get("posterior_contexts", 256), output_dir=out_dir,
                                       seed=cfg.seed, device=cfg.get("device", "auto"))
    if cfg.get("report", False):
        evaluate_report(cfg.ckpt_path, out_dir, max_sequences=cfg.get("report_sequences", 256), seed=cfg.seed,
                        posterior=posterior, device=cfg.get("device", "auto"))


if __name__ == "__main__":
    main()
