"""``python -m bayestrain.evaluate ckpt_path=...`` (console script ``bayestrain-eval``).

Rebuilds the run from the configuration stored in the checkpoint, recomputes the evaluation
metrics on the chosen split (beside the exact Bayes predictor for wind tunnels), prints the
table and writes the reliability diagram into the evaluation's run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bayestrain.checkpoint import load_checkpoint


def module_from_checkpoint(ckpt: dict):
    from bayestrain.train import build

    cfg = OmegaConf.create(ckpt["bayestrain_config"])
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("export"):
        from bayestrain.checkpoint import export_safetensors

        print(f"exported the model weights to {export_safetensors(cfg.ckpt_path, cfg.export)}")
    evaluate(cfg.ckpt_path, cfg.split, cfg.max_batches, cfg.exact_baseline,
             HydraConfig.get().runtime.output_dir, cfg.seed)


if __name__ == "__main__":
    main()
