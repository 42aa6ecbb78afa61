"""The real conf/ composes and instantiates; short real training runs for every condition
option; resume; bad input fails before training with a message naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from bayestrain.train import build, compose_config, train

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "data.batch_size=8", "data.seq_len=8", "data.val_size=16", "data.train_batches_per_epoch=4",
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "callbacks.progress=null",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(tmp_path: Path, overrides: list[str], config_name: str = "train"):
    return compose_config(overrides, tmp_path, config_name)


@pytest.mark.parametrize("group", ["task", "model", "condition", "module", "optimizer", "scheduler", "data", "trainer", "logger", "callbacks"])
def test_every_group_option_composes_and_instantiates(tmp_path, group):
    csv_file = tmp_path / "tiny.csv"
    csv_file.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20)))
    text = ["experiment=finetune_minilm_fortunes"]
    extras = {  # options that only make sense with companions from other groups
        ("task", "markov"): ["condition=none"],  # not exchangeable
        ("condition", "reversibility"): ["model=set_sinkhorn"],
        ("condition", "block"): ["model=set_sinkhorn"],
        ("model", "minilm"): text,
        ("model", "hf_encoder"): text + ["model.pretrained=minilm"],
        ("module", "classifier"): text,
        ("data", "fortunes"): text,
        ("data", "text_csv"): text + ["data=text_csv", f"data.train_file={csv_file}", "data.labels=[a,b]"],
        # a wind-tunnel-pretrained causal LM, exported and reloaded: a few pretraining steps
        ("model", "hf_causal_windtunnel"): ["model.pretrain_steps=2", "model.pretrain_batch_size=4"],
    }
    for option in options(group):
        cfg = make_cfg(tmp_path, [f"{group}={option}", *extras.get((group, option), [])])
        objs = build(cfg)
        if objs["task"] is not None:
            assert objs["model"].vocab_size == objs["task"].vocab_size
        if group == "trainer":
            needs_gpu = cfg.trainer.accelerator == "gpu" or option == "slurm"
            if needs_gpu and not torch.cuda.is_available():
                assert cfg.trainer.accelerator in ("gpu", "auto")  # composed; instantiated on GPU machines
                continue
            instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        elif group in ("logger", "callbacks"):
            for node in (cfg.get(group) or {}).values():
                assert instantiate(node) is not None


def test_every_experiment_composes(tmp_path):
    for option in options("experiment"):
        cfg = make_cfg(tmp_path, [f"experiment={option}"])
        if "pretrain_steps" in cfg.model:  # builds pretrain a causal LM first: keep that short here
            cfg.model.pretrain_steps = 2
        build(cfg)


@pytest.mark.parametrize("condition", options("condition"))
def test_short_training_run_for_each_condition(tmp_path, condition):
    # block-level conditions that refuse causal models run on the set-layout Sinkhorn model
    model = ["model=set_sinkhorn"] if condition in ("reversibility", "block") else []
    cfg = make_cfg(tmp_path, TINY + model + [f"condition={condition}", "logger=csv"])
    result = train(cfg)
    val = result["val"]
    martingale = "martingale_l2" if condition == "martingale_l2" else "martingale"
    for key in ["val/nll", "val/ece", "val/mce", "val/brier", "val/acc", "val/bayes_gap_bits",
                "val/violation/exchangeability", f"val/violation/{martingale}", "train/loss_task_epoch",
                "train/loss_total_epoch"]:
        assert key in val and val[key] == val[key], key  # present and not NaN
    for name in cfg.condition:
        assert f"train/violation/{name}_epoch" in val, name
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "val_reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["summary"]
    assert rows["exact Bayes"]["bayes_gap_bits"] < 1e-9
    assert abs(rows["exact Bayes"][f"violation/{martingale}"]) < 1e-9
    assert rows["model"]["bayes_gap_bits"] > rows["exact Bayes"]["bayes_gap_bits"]


def test_wandb_offline_run_logs_metrics_and_image(tmp_path):
    cfg = make_cfg(tmp_path, TINY + ["logger=wandb"])
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one W&B run per job
    media = list(runs[0].rglob("*.png"))
    assert media, "the reliability diagram reaches W&B as an image"


def test_resume_continues_from_the_same_step(tmp_path):
    first = make_cfg(tmp_path / "a", TINY + ["logger=none", "summary=false"])
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    second = make_cfg(tmp_path / "b", TINY + ["logger=csv", "summary=false", "trainer.max_steps=6", f"ckpt_path={ckpt}"])
    train(second)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert resumed["lr_schedulers"][0]["last_epoch"] == 6  # the schedule resumed where it stopped
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "b" / "csv").rglob("metrics.csv")))))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss_task_step")})
    assert steps and min(steps) >= 4, steps  # no step was trained twice


def test_resuming_without_saved_schedule_under_one_is_refused(tmp_path):
    first = make_cfg(tmp_path / "a", TINY + ["logger=none", "summary=false", "scheduler=none"])
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert not torch.load(ckpt, weights_only=True).get("lr_schedulers")
    second = make_cfg(tmp_path / "b", TINY + ["logger=none", "summary=false", "trainer.max_steps=6", f"ckpt_path={ckpt}"])
    with pytest.raises(ValueError, match="scheduler=none"):
        train(second)
    same = make_cfg(tmp_path / "c", TINY + ["logger=none", "summary=false", "trainer.max_steps=6", "scheduler=none",
                                           f"ckpt_path={ckpt}"])
    train(same)  # the run's own setting resumes


def test_configs_saved_before_the_scheduler_group_still_build():
    from omegaconf import OmegaConf

    from bayestrain.evaluate import _upgrade_config

    cfg = _upgrade_config(OmegaConf.create({"module": {"_target_": "x", "warmup_steps": 20, "lr_schedule": "linear"}}))
    assert "warmup_steps" not in cfg.module and "lr_schedule" not in cfg.module
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.scheduler)(opt, total_steps=100)
    f = sched.lr_lambdas[0]
    assert f(0) == pytest.approx(1 / 20) and f(60) == pytest.approx(0.5)  # linear warm-up, then linear decay


def test_vocabulary_mismatch_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, ["model.vocab_size=5"])
    with pytest.raises(ValueError, match="model.vocab_size=5 does not match task.vocab_size=8"):
        build(cfg)


def test_markov_refuses_sequence_conditions_before_training(tmp_path):
    cfg = make_cfg(tmp_path, TINY + ["task=markov", "logger=none"])
    with pytest.raises(InstantiationException, match="exchangeable.*condition=none"):
        train(cfg)
    train(make_cfg(tmp_path, TINY + ["task=markov", "condition=none", "logger=none", "summary=false"]))


def test_unknown_choices_and_keys_are_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="(?s)task/nope.*Available options.*dirichlet"):
        make_cfg(tmp_path, ["task=nope"])
    with pytest.raises(ConfigCompositionException, match="(?s)condition/strict.*martingale"):
        make_cfg(tmp_path, ["condition=strict"])
    with pytest.raises(ConfigCompositionException, match="model.widht"):
        make_cfg(tmp_path, ["model.widht=3"])
    with pytest.raises(ConfigCompositionException, match="model.d_model=abc") as err:
        make_cfg(tmp_path, ["model.d_model=abc"])
    assert "could not be converted to Integer" in str(err.value.__cause__)  # the schema's type check
    with pytest.raises(ConfigCompositionException, match="seed=one"):
        make_cfg(tmp_path, ["seed=one"])
    with pytest.raises(InstantiationException, match="layout='diagonal'.*'bidirectional'"):
        build(make_cfg(tmp_path, ["model.layout=diagonal"]))


def test_command_line_entry_points(tmp_path):
    """The console entry points as a user runs them: train a few steps, then evaluate."""
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "bayestrain.train", *TINY, "logger=none", f"hydra.run.dir={run}"],
        check=True, env=env, capture_output=True, text=True,
    )
    out = subprocess.run(
        [sys.executable, "-m", "bayestrain.evaluate", f"ckpt_path={run}/checkpoints/last.ckpt",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        check=True, env=env, capture_output=True, text=True,
    ).stdout
    assert "exact Bayes" in out and "bayes gap" in out
    assert (tmp_path / "eval" / "val_reliability.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "bayestrain.evaluate", f"ckpt_path={tmp_path}/missing.ckpt"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.ckpt" in bad.stderr + bad.stdout


def test_lagrangian_resume_reproduces_the_uninterrupted_run(tmp_path):
    lag = ["condition.martingale.mode=lagrangian", "condition.martingale.dual_lr=5.0",
           "condition.exchangeability.mode=lagrangian", "logger=none", "summary=false"]
    train(make_cfg(tmp_path / "full", TINY + lag + ["trainer.max_steps=8"]))
    train(make_cfg(tmp_path / "part", TINY + lag + ["trainer.max_steps=4"]))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    saved = torch.load(part, weights_only=True)["state_dict"]
    assert saved["lambda_martingale"] > 0, "the multiplier moved and is module state"
    train(make_cfg(tmp_path / "resumed", TINY + lag + ["trainer.max_steps=8", f"ckpt_path={part}"]))
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-6, atol=1e-7, msg=key)
