"""Lightning callbacks: the reliability diagram (PNG in the run folder and a W&B image) and a
config snapshot stored inside every checkpoint so ``bayestrain-eval`` can rebuild the run."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from bayestrain.plots import reliability_diagram, save_figure


class ReliabilityDiagram(pl.Callback):
    """After each validation (and test) loop: draw the module's reliability bins, save
    ``{dirpath}/{stage}_reliability.png`` (overwritten: the latest) and, with a W&B logger, log
    it as ``{stage}/reliability``."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def _draw(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        bins = getattr(pl_module, "last_reliability", None)
        if bins is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        fig = reliability_diagram(bins, title=f"{stage} reliability (step {trainer.global_step})")
        save_figure(fig, self.dirpath / f"{stage}_reliability.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"{stage}/reliability", images=[fig], step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module, "test")


class ConfigSnapshot(pl.Callback):
    """Keeps the resolved run configuration (a plain dict) in every checkpoint."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["bayestrain_config"] = self.config
