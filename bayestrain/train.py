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
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
os.environ.setdefault("WANDB_MODE", "offline")  # no API key here: never block on a login
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: list[str], output_dir: str | Path, config_name: str = "train") -> DictConfig:
    """The config ``bayestrain-train`` would run with these overrides, composed in-process (for
    scripts, notebooks and tests), its run folder set to ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def build(cfg: DictConfig) -> dict:
    """Instantiate task, data, model, conditions and the Lightning module from a composed
    config.  ``task`` may be null (real data); the model then takes no ``vocab_size``."""
    task = instantiate(cfg.task) if cfg.get("task") is not None else None
    model_kw = {}
    if task is not None and "vocab_size" in cfg.model:
        model_vocab = cfg.model.get("vocab_size")
        if model_vocab is not None and model_vocab != task.vocab_size:
            raise ValueError(
                f"model.vocab_size={model_vocab} does not match task.vocab_size={task.vocab_size} "
                f"({type(task).__name__}); remove the override (the model takes the task's) or make them equal"
            )
        model_kw["vocab_size"] = task.vocab_size
    model = instantiate(cfg.model, **model_kw)
    conditions = {}
    for name, node in (cfg.get("condition") or {}).items():
        if node is None:
            continue  # condition.<name>=null switches one off
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"condition.{name} must be a config with a _target_, got {node!r}")
        conditions[name] = instantiate(node)
    datamodule = instantiate(cfg.data, **({"task": task} if task is not None else {}))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None  # scheduler=none: {}
    module = instantiate(cfg.module, model=model, task=task, conditions=conditions,
                         optimizer=instantiate(cfg.optimizer), scheduler=scheduler, seed=cfg.seed)
    return {"task": task, "model": model, "conditions": conditions, "datamodule": datamodule, "module": module}


def train(cfg: DictConfig) -> dict:
    from lightning.pytorch import seed_everything

    from bayestrain.callbacks import ConfigSnapshot

    # resolve every interpolation (run folder, ${hydra:...}) once, here, so spawned or launched
    # ranks all see the values of the process that composed the config
    OmegaConf.resolve(cfg)
    if cfg.get("ckpt_path"):
        from bayestrain.checkpoint import load_checkpoint

        load_checkpoint(cfg.ckpt_path)  # refuse a missing or damaged checkpoint before building anything
    seed_everything(cfg.seed, workers=True, verbose=False)
    objs = build(cfg)
    module = objs["module"]
    # a group entry set to null (e.g. callbacks.progress=null) switches it off
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ConfigSnapshot(OmegaConf.to_container(cfg, resolve=True)))
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    from bayestrain.checkpoint import AtomicCheckpointIO

    plugins = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])] + [AtomicCheckpointIO()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    trainer.preempted = False

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=objs["datamodule"], ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # killed or pre-empted: PreemptionCheckpoint wrote last.ckpt
        if not trainer.preempted:
            raise
    out_dir = Path(cfg.paths.output_dir)
    result = {"output_dir": str(out_dir), "val": {k: float(v) for k, v in trainer.callback_metrics.items()}}

    result["preempted"] = trainer.preempted
    if cfg.get("summary", True) and trainer.is_global_zero and not trainer.preempted:
        from bayestrain.report import summary_table

        # the module decides what its end-of-run table compares (e.g. the exact Bayes predictor)
        title, rows = module.summary_rows(objs["datamodule"])
        result["summary"] = rows
        print(summary_table(rows, title=title))
        print(f"run folder:  {out_dir}\ncheckpoints: {out_dir / 'checkpoints'}\n"
              f"reliability: {out_dir / 'val_reliability.png'}")
    for lg in loggers:  # one W&B run per job: close it before the next job starts
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
    return result


def _refuse_multirun_ddp(cfg: DictConfig) -> None:
    """``-m`` with ``strategy=ddp``: Lightning relaunches the script for ranks 1..N-1, and each
    child would re-run the whole sweep.  ddp_spawn and submitit start ranks without that."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str(cfg.trainer.get("strategy", "auto"))
    if HydraConfig.get().mode == RunMode.MULTIRUN and strategy.split("_")[0] in ("ddp", "fsdp") and "spawn" not in strategy:
        raise ValueError(
            f"trainer.strategy={strategy!r} cannot run inside a Hydra multirun (-m): Lightning relaunches "
            "this script for every extra rank and each would re-run the sweep. Use trainer=ddp_spawn "
            "(trainer.strategy=ddp_spawn), or hydra/launcher=submitit_slurm / submitit_local, which start "
            "one job per sweep point"
        )


def _group_sweep_runs(cfg: DictConfig) -> None:
    """In a multirun, each job is its own W&B run, grouped by the sweep's folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    hc = HydraConfig.get()
    if wandb_cfg is not None and hc.mode == RunMode.MULTIRUN and wandb_cfg.get("group") is None:
        wandb_cfg.group = Path(hc.sweep.dir).name


def objective(cfg: DictConfig, result: dict) -> float:
    """The sweep objective: ``objective.metric`` from the run's final metrics.  A run that ends
    without it (or with NaN) raises, so the sweeper records a failed trial, never a number."""
    metric = cfg.objective.metric
    value = result["val"].get(metric)
    if value is None or value != value:
        raise RuntimeError(
            f"objective.metric={metric!r} was not produced by this run (got {value!r}); available: "
            f"{sorted(result['val'])}"
        )
    return float(value)


# an absolute folder: console scripts (bayestrain-train/-eval) find conf/ as python -m does
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    _refuse_multirun_ddp(cfg)
    _group_sweep_runs(cfg)
    result = train(cfg)
    if result.get("preempted"):
        return None
    return objective(cfg, result)


if __name__ == "__main__":
    main()
