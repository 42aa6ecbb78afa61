"""Checkpoints that survive faults: atomic writes, safe (weights-only) reads that refuse a
damaged file with a clear error, and a callback that checkpoints on SIGTERM / SIGUSR1."""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target folder, fsyncs, then ``os.replace``s it: a crash
    or a kill during the write never leaves a truncated checkpoint under the real name, and the
    previous good file stays until the new one is complete."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_checkpoint(path: str | Path) -> dict:
    """Safe (weights-only) loading; a missing, truncated or foreign file is refused with an
    error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; pass a .ckpt file from a run's checkpoints/ folder"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / corrupted / not a checkpoint / unsafe pickle
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err}); "
            "it may be truncated or corrupted: use an earlier checkpoint from the same folder"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "bayestrain_config" not in ckpt:
        raise ValueError(f"ckpt_path={str(path)!r} was not written by bayestrain-train (no stored config)")
    return ckpt


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (a kill, a cluster's pre-emption notice) or SIGUSR1 (SLURM's, with
    ``--signal=USR1@90``): finish the current batch, write ``{dirpath}/last.ckpt``, and stop
    training cleanly.  Resume with ``ckpt_path={dirpath}/last.ckpt``.

    Under SLURM with ``trainer.plugins`` holding ``SLURMEnvironment(auto_requeue=True)``
    (``conf/trainer/slurm.yaml``), Lightning itself handles SIGUSR1: it checkpoints and requeues
    the job; this callback then leaves SIGUSR1 alone."""

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum  # acted on at the next batch boundary, never mid-update

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        slurm_requeue = isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment) and getattr(
            trainer._accelerator_connector.cluster_environment, "auto_requeue", False
        )
        for sig in self.signals:
            if sig == signal.SIGUSR1 and slurm_requeue:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
                pass

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.received is None:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        pl_module.print(
            f"received signal {signal.Signals(self.received).name}: checkpoint at step {trainer.global_step} "
            f"written to {path}; resume with ckpt_path={path}"
        )
        trainer.preempted = True

    def teardown(self, trainer, pl_module, stage) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
