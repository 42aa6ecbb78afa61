"""Scale out and survive: real 2-process DDP (gloo), real Hydra sweeps (submitit_local,
Optuna), kill-and-resume, damaged checkpoints, atomic writes, the multirun+ddp trap, Docker."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from bayestrain.checkpoint import AtomicCheckpointIO, load_checkpoint
from bayestrain.train import train
from tests.test_train import TINY, make_cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


class RankAgreement(pl.Callback):
    """After every optimizer step: parameters, buffers (multipliers) identical on all ranks."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        flat = torch.cat([t.detach().double().flatten() for t in pl_module.state_dict().values()
                          if t.is_floating_point()])
        gathered = pl_module.all_gather(flat)  # (world, n)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), f"ranks disagree at step {trainer.global_step}"
        pl_module.rank_checks = getattr(pl_module, "rank_checks", 0) + 1


@pytest.mark.slow
def test_ddp_two_processes_agree_and_validate_like_one(tmp_path, monkeypatch):
    import bayestrain.train as bt

    made = []
    real_instantiate = bt.instantiate

    def instantiate_with_check(node, *args, **kwargs):  # add the agreement check to the Trainer
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], RankAgreement()]
        obj = real_instantiate(node, *args, **kwargs)
        made.append(obj)
        return obj

    monkeypatch.setattr(bt, "instantiate", instantiate_with_check)
    common = TINY + ["logger=csv", "summary=false", "model=set_sinkhorn", "data.val_size=32",
                     "condition=block", "+condition.martingale._target_=bayestrain.conditions.Martingale",
                     "+condition.martingale.mode=lagrangian", "+condition.martingale.dual_lr=5.0"]
    ddp = train(make_cfg(tmp_path / "ddp", common + ["trainer=ddp_spawn"]))
    monkeypatch.setattr(bt, "instantiate", real_instantiate)
    trainers = [t for t in made if isinstance(t, pl.Trainer)]
    assert trainers and any(isinstance(c, RankAgreement) for c in trainers[0].callbacks)
    assert trainers[0].world_size == 2
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and float(ckpt["state_dict"]["lambda_martingale"]) > 0

    # the same final model validated in one process: the 2-rank validation split the data
    # without duplicating sequences, so every deterministic metric agrees
    from bayestrain.evaluate import module_from_checkpoint

    module, objs, _ = module_from_checkpoint(ckpt)
    single = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = single.validate(module, datamodule=objs["datamodule"], verbose=False)
    for key in ["val/nll", "val/brier", "val/acc", "val/ece", "val/bayes_gap_bits", "val/violation/martingale",
                "val/violation/reversibility"]:
        assert ddp["val"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def _losses(folder: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(next(folder.rglob("metrics.csv")))))
    return {int(r["step"]): float(r["train/loss_total_step"]) for r in rows if r.get("train/loss_total_step")}


class KillAt(pl.Callback):
    """Sends this very process a real SIGTERM after step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_resume_reproduces_the_run(tmp_path, monkeypatch):
    import bayestrain.train as bt

    lag = TINY + ["logger=csv", "summary=false", "trainer.max_steps=10", "condition.martingale.mode=lagrangian",
                  "condition.martingale.dual_lr=5.0", "trainer.val_check_interval=4"]
    full = train(make_cfg(tmp_path / "full", lag))
    assert not full["preempted"]

    real_instantiate = bt.instantiate

    def with_kill(node, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [KillAt(5), *kwargs["callbacks"]]
        return real_instantiate(node, *args, **kwargs)

    monkeypatch.setattr(bt, "instantiate", with_kill)
    killed = train(make_cfg(tmp_path / "killed", lag))
    monkeypatch.setattr(bt, "instantiate", real_instantiate)
    assert killed["preempted"]
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == 5  # mid-epoch (4 batches per epoch)
    resumed = train(make_cfg(tmp_path / "resumed", lag + [f"ckpt_path={ckpt}"]))
    assert not resumed["preempted"]

    a, b, c = _losses(tmp_path / "full"), _losses(tmp_path / "killed"), _losses(tmp_path / "resumed")
    stitched = {**b, **c}
    assert sorted(stitched) == sorted(a)
    for step in a:
        assert stitched[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step
    full_sd = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    res_sd = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(res_sd["lambda_martingale"], full_sd["lambda_martingale"])


def test_damaged_checkpoint_is_refused_and_the_good_one_kept(tmp_path):
    train(make_cfg(tmp_path / "run", TINY + ["logger=none", "summary=false", "trainer.val_check_interval=2"]))
    ckdir = tmp_path / "run" / "checkpoints"
    last = ckdir / "last.ckpt"
    good = [p for p in ckdir.glob("step*.ckpt")]
    assert good
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated, as by a crash without atomic writes
    with pytest.raises(ValueError, match=r"last\.ckpt.*truncated or corrupted"):
        train(make_cfg(tmp_path / "again", TINY + ["logger=none", f"ckpt_path={last}"]))
    assert all(p.is_file() for p in good)
    load_checkpoint(good[0])  # the earlier checkpoint still loads
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary left behind


def _run_cli(args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "bayestrain.train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_multirun_with_ddp_is_refused_with_the_fix(tmp_path):
    out = _run_cli(["-m", "trainer=ddp", "seed=1,2", f"hydra.sweep.dir={tmp_path}", "logger=none"])
    assert out.returncode != 0
    assert "ddp_spawn" in out.stderr and "submitit" in out.stderr


@pytest.mark.slow
def test_submitit_local_sweep_two_jobs(tmp_path):
    out = _run_cli(["-m", "hydra/launcher=local", *TINY, "logger=wandb", "condition.martingale.weight=0.1,1.0",
                    f"hydra.sweep.dir={tmp_path}", "hydra.launcher.timeout_min=10"])
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file(), job
        runs = list((tmp_path / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, (job, runs)


@pytest.mark.slow
def test_optuna_sweep_two_trials(tmp_path):
    out = _run_cli(["-m", "experiment=sweep_optuna", "hydra.sweeper.n_trials=2", *TINY, "logger=wandb",
                    f"hydra.sweep.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file(), job
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best and "condition.martingale.weight" in best


def test_dockerfile_is_pinned_and_copies_existing_files():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms, "no FROM line"
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"base image {image} is not pinned"
    for line in re.findall(r"^(?:COPY|ADD)\s+(.+)$", text, flags=re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    for line in text.splitlines():  # every instruction is a known Dockerfile keyword
        word = line.split(" ", 1)[0]
        if line.strip() and not line.startswith(("#", " ", "\t")):
            assert word in {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "ARG",
                            "LABEL", "USER", "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK"}, line
    assert (ROOT / "docker" / "entrypoint.sh").is_file()


def test_export_to_safetensors(tmp_path):
    from safetensors.torch import load_file

    from bayestrain.checkpoint import export_safetensors
    from bayestrain.evaluate import module_from_checkpoint

    train(make_cfg(tmp_path / "run", TINY + ["logger=none", "summary=false", "model.tied_qk=true"]))
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = export_safetensors(ckpt_path, tmp_path / "model.safetensors")
    weights = load_file(out)
    module, _, _ = module_from_checkpoint(load_checkpoint(ckpt_path))
    missing, unexpected = module.model.load_state_dict(weights, strict=False)
    assert not unexpected
    assert all(".k_proj." in m for m in missing)  # only the tied alias is stored once
    for name, tensor in weights.items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
