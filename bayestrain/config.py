"""Structured-config schemas: the typed shape of the main config groups.

Hydra merges each YAML file of a schema'd group onto its dataclass, so a value of the wrong
type or an unknown key fails at composition with the key's full name (``model.d_model``),
before anything is built.  Registered with Hydra's ConfigStore by the entry points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelSchema:
    _target_: str = "bayestrain.model.BayesTransformer"
    vocab_size: Optional[int] = None
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 128
    pos_encoding: str = "learned"
    dropout: float = 0.0
    norm: str = "layernorm"
    layout: str = "causal"
    attention: str = "softmax"
    n_iters: int = 3
    tied_qk: bool = False
    residual: str = "plain"
    backend: str = "auto"
    prior: Any = "uniform"


@dataclass
class WindTunnelDataSchema:
    _target_: str = "bayestrain.tasks.WindTunnelDataModule"
    seq_len: int = 32
    batch_size: int = 64
    val_size: int = 512
    val_batch_size: Optional[int] = None
    train_batches_per_epoch: int = 250
    seed: int = 0


@dataclass
class TrainSchema:
    """Top-level keys of ``conf/train.yaml`` (the groups are typed by their own schemas)."""

    seed: int = 0
    run_name: str = "run"
    summary: bool = True
    ckpt_path: Optional[str] = None
    objective: Any = None
    task: Any = None
    data: Any = None
    model: Any = None
    condition: Any = None
    module: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None
    experiment: Any = None


SCHEMAS = {
    ("model", "transformer_schema"): ModelSchema,
    ("data", "windtunnel_schema"): WindTunnelDataSchema,
    (None, "train_schema"): TrainSchema,
}


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore  # only the entry points call this

    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
