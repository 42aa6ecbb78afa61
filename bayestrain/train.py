"""``python -m bayestrain.train [hydra overrides]`` (console script ``bayestrain-train``).

The thin Hydra entry point: compose and validate the config, build the objects, train, and
print the model beside the exact Bayes predictor.  Everything below ``train(cfg)`` receives
built objects, never a DictConfig.
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bayestrain.config import register_schemas

register_schemas()
os.environ.setdefault("WANDB_MODE", "offline")  # no API key here: never block on a login
os.environ.setdefault("WANDB_SILENT", "true")


def build(cfg: DictConfig) -> dict:
    """Instantiate task, data, model and conditions from a composed config."""
    task = instantiate(cfg.task)
    model_vocab = cfg.model.get("vocab_size")
    if model_vocab is not None and model_vocab != task.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_vocab} does not match task.vocab_size={task.vocab_size} "
            f"({type(task).__name__}); remove the override (the model takes the task's) or make them equal"
        )
    model = instantiate(cfg.model, vocab_size=task.vocab_size)
    conditions = {}
    for name, node in (cfg.get("condition") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"condition.{name} must be a config with a _target_, got {node!r}")
        conditions[name] = instantiate(node)
    datamodule = instantiate(cfg.data, task=task)
    return {"task": task, "model": model, "conditions": conditions, "datamodule": datamodule}


def train(cfg: DictConfig) -> dict:
    from lightning.pytorch import seed_everything

    from bayestrain.callbacks import ConfigSnapshot
    from bayestrain.module import BayesLitModule

    seed_everything(cfg.seed, workers=True, verbose=False)
    objs = build(cfg)
    module = BayesLitModule(
        objs["model"], objs["task"], objs["conditions"], optimizer=instantiate(cfg.optimizer), seed=cfg.seed
    )
    # a group entry set to null (e.g. callbacks.progress=null) switches it off
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ConfigSnapshot(OmegaConf.to_container(cfg, resolve=True)))
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=objs["datamodule"], ckpt_path=cfg.get("ckpt_path"))
    out_dir = Path(cfg.paths.output_dir)
    result = {"output_dir": str(out_dir), "val": {k: float(v) for k, v in trainer.callback_metrics.items()}}

    if cfg.get("summary", True) and trainer.is_global_zero:
        from bayestrain.report import summary_table
        from bayestrain.summary import compare_with_exact

        rows = compare_with_exact(module, objs["datamodule"], seed=cfg.seed)
        result["summary"] = rows
        print(summary_table(rows, title=f"{type(objs['task']).__name__}: validation set"))
        ckpt_dir = out_dir / "checkpoints"
        print(f"run folder:  {out_dir}\ncheckpoints: {ckpt_dir}\nreliability: {out_dir / 'val_reliability.png'}")
    for lg in loggers:  # one W&B run per job: close it before the next job starts
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    nll = result["val"].get("val/nll")
    return nll


if __name__ == "__main__":
    main()
