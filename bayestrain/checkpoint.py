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
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from the team
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


def export_safetensors(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """The model's weights from a training checkpoint as a ``.safetensors`` file (no pickle);
    the run's configuration is stored in its metadata as JSON."""
    import json

    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    prefix = "model."
    weights, seen = {}, {}
    for name, tensor in ckpt["state_dict"].items():
        if not name.startswith(prefix):
            continue  # multipliers and metric states stay in the checkpoint
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key in seen:  # tied parameters (W_Q = W_K) are stored once
            continue
        seen[key] = name
        weights[name[len(prefix):]] = tensor.contiguous()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_path), metadata={"bayestrain_config": json.dumps(ckpt["bayestrain_config"])})
    return out_path


class PreemptionCheckpoint(pl.Callback):
    """Checkpoint on SIGTERM (a kill, a cluster's pre-emption notice) and SIGUSR1, then stop.

    SIGTERM: Lightning's own handler finishes the current batch and raises
    ``SIGTERMException`` on every rank; this callback writes ``{dirpath}/last.ckpt`` from
    ``on_exception`` and ``bayestrain.train`` reports the run as pre-empted.  SIGUSR1 (SLURM's
    warning, ``--signal=USR1@90``): the current batch ends, the checkpoint is written and
    training stops cleanly.  Under SLURM with ``SLURMEnvironment(auto_requeue=True)``
    (``conf/trainer/slurm.yaml``) Lightning itself checkpoints and requeues on SIGUSR1, and this
    callback leaves SIGUSR1 alone.  Resume with ``ckpt_path={dirpath}/last.ckpt``."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.received: int | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received = signum  # acted on at the next batch boundary, never mid-update

    def on_fit_start(self, trainer, pl_module) -> None:
        env = trainer._accelerator_connector.cluster_environment
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return
        try:
            self._previous = signal.signal(signal.SIGUSR1, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _save(self, trainer, why: str) -> None:
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        trainer.preempted = True
        if trainer.is_global_zero:
            print(f"{why}: checkpoint at step {trainer.global_step} written to {path}; resume with ckpt_path={path}")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.received is not None:
            self._save(trainer, f"received {signal.Signals(self.received).name}")
            trainer.should_stop = True
            self.received = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self._save(trainer, "received SIGTERM")

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
