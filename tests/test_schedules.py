"""Learning-rate schedules: exact factors, refusals that name the fix, and a real run that
ends at the configured final learning rate."""
from __future__ import annotations

import math

import pytest
import torch

from bayestrain.schedules import warmup_decay
from bayestrain.train import build, compose_config


def factors(total, steps=None, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_decay(opt, total_steps=total, **kw)
    out = []
    for _ in range(steps or total + 1):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_hits_its_landmarks():
    f = factors(110, warmup_steps=10, decay="cosine", final_ratio=0.1)
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warm-up
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f[110] == pytest.approx(0.1)  # the last step runs at final_ratio x lr
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after warm-up


def test_linear_and_constant():
    f = factors(20, warmup_steps=4, decay="linear")
    assert [f[4], f[12], f[20]] == pytest.approx([1.0, 0.5, 0.0])
    assert factors(20, warmup_steps=0, decay="constant", final_ratio=1.0) == pytest.approx([1.0] * 21)


@pytest.mark.parametrize("kw,needle", [
    (dict(total_steps=10, decay="step"), "decay='step'"),
    (dict(total_steps=10, final_ratio=1.5), "final_ratio=1.5"),
    (dict(total_steps=10, warmup_steps=-1), "warmup_steps=-1"),
    (dict(total_steps=math.inf), "scheduler=constant"),  # max_steps=-1 and max_epochs=-1
    (dict(total_steps=0), "limit_train_batches"),
])
def test_bad_settings_are_refused_by_name(kw, needle):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        warmup_decay(opt, **kw)


def test_a_warmup_longer_than_the_run_is_flagged():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match="warmup_steps=50"):
        warmup_decay(opt, total_steps=8, warmup_steps=50)


def test_training_run_ends_at_the_final_learning_rate(tmp_path):
    import lightning.pytorch as pl

    cfg = compose_config([
        "scheduler=cosine", "scheduler.warmup_steps=2", "scheduler.final_ratio=0.25", "optimizer.lr=0.01",
        "data.batch_size=4", "data.seq_len=8", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "condition=none",
    ], tmp_path)
    objs = build(cfg)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, callbacks=[Record()])
    trainer.fit(objs["module"], datamodule=objs["datamodule"])
    assert lrs[:2] == pytest.approx([0.005, 0.01])  # warm-up
    assert lrs[-1] == pytest.approx(0.01 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_learning_rate_is_logged(tmp_path):
    import csv

    from bayestrain.train import train

    cfg = compose_config([
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "logger=csv",
        "callbacks.progress=null", "summary=false", "scheduler.warmup_steps=0", "optimizer.lr=0.01",
        "data.batch_size=4", "data.seq_len=8", "data.val_size=8", "data.train_batches_per_epoch=6",
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "condition=none",
    ], tmp_path)
    train(cfg)
    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert len(lrs) == 6 and lrs[0] == pytest.approx(0.01)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # cosine: falling, step by step
