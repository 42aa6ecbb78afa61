"""Real text: the fortunes corpus loader, CSV/JSONL files with their refusals, temperature
scaling, and a few-step fine-tune of every MiniLM experiment (logs every metric;
bayestrain-eval on the calibrated checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bayestrain.text import (
    FORTUNES_DIR,
    FORTUNES_TOPICS,
    FortunesDataModule,
    TextClassificationDataModule,
    load_fortunes,
    normalise,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_cfg  # noqa: E402

needs_fortunes = pytest.mark.skipif(
    not Path(FORTUNES_DIR).is_dir(), reason="Debian's fortunes corpus: apt-get install -y fortunes"
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: no OpenMP spin-waiting against other work
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- fortunes
@needs_fortunes
def test_fortunes_topics_splits_and_deduplication():
    dm = FortunesDataModule()
    assert dm.labels == list(FORTUNES_TOPICS)
    counts = dm.counts()
    for topic in FORTUNES_TOPICS:
        total = sum(counts[s][topic] for s in ("train", "val", "test"))
        assert 550 <= total <= 1100, (topic, total)  # several hundred entries each
        assert abs(counts["train"][topic] / total - 0.7) < 0.01
        assert abs(counts["val"][topic] / total - 0.15) < 0.01
    keys = {s: [normalise(t) for t in dm.texts[s]] for s in ("train", "val", "test")}
    for s, ks in keys.items():
        assert len(ks) == len(set(ks)), f"duplicates in {s}"
        assert all(k for k in ks), f"empty text in {s}"
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])
    again = FortunesDataModule(labels=list(reversed(FORTUNES_TOPICS)))  # deterministic, order-free
    for s in ("train", "val", "test"):
        assert sorted(dm.texts[s]) == sorted(again.texts[s])
    # an entry filed under two topics has no single label: it is dropped from both
    corpus = load_fortunes(["cookie", "fortunes"])
    assert not {normalise(t) for t in corpus["cookie"]} & {normalise(t) for t in corpus["fortunes"]}


def test_missing_corpus_or_topic_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        FortunesDataModule(corpus_dir=str(tmp_path / "none"))
    (tmp_path / "science").write_text("E = mc^2\n%\nfoo\n%\n")
    with pytest.raises(FileNotFoundError, match="topic 'poetry'.*available topics: \\['science'\\]"):
        FortunesDataModule(labels=["science", "poetry"], corpus_dir=str(tmp_path))


# ----------------------------------------------------------------------------- files
def _csv(path: Path, rows, header=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_and_jsonl_files_with_refusals_naming_the_problem(tmp_path):
    rows = [(f"text number {i} about {'cats' if i % 2 else 'dogs'}", "cat" if i % 2 else "dog") for i in range(40)]
    train = _csv(tmp_path / "train.csv", rows + [("   ", "cat"), (rows[0][0].upper(), "dog")])
    with pytest.warns(UserWarning, match="empty text"):
        dm = TextClassificationDataModule(train_file=str(train), labels=["dog", "cat"], val_fraction=0.2,
                                          test_fraction=0.2)
    n = {s: len(dm.texts[s]) for s in ("train", "val", "test")}
    assert sum(n.values()) == 40 and n["val"] == n["test"] == 8  # deduplicated, carved by hash
    assert dm.labels == ["dog", "cat"] and set(dm.targets["train"]) == {0, 1}

    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in rows[:6]))
    dm = TextClassificationDataModule(train_file=str(_csv(tmp_path / "t2.csv", rows, ("sentence", "y"))),
                                      val_file=str(jsonl), text_column="sentence", label_column="y")
    assert dm.labels == ["cat", "dog"] and len(dm.texts["val"]) == 6
    assert not {normalise(t) for t in dm.texts["train"]} & {normalise(t) for t in dm.texts["val"]}

    with pytest.raises(ValueError, match="no column 'text' \\(text_column\\).*\\['sentence', 'y'\\]"):
        TextClassificationDataModule(train_file=str(tmp_path / "t2.csv"), labels=["cat", "dog"])
    with pytest.raises(ValueError, match="no column 'label' \\(label_column\\)"):
        TextClassificationDataModule(train_file=str(tmp_path / "t2.csv"), text_column="sentence", labels=["cat", "dog"])
    bad = _csv(tmp_path / "bad.csv", rows + [("a text about a bird", "bird")])
    with pytest.raises(ValueError, match="line 42: unknown label 'bird' in column 'label'.*\\['dog', 'cat'\\]"):
        TextClassificationDataModule(train_file=str(bad), labels=["dog", "cat"])
    with pytest.raises(ValueError, match="line 1 has no column 'text'"):
        TextClassificationDataModule(train_file=str(jsonl), labels=["dog", "cat"])


# ----------------------------------------------------------------------------- temperature scaling
def test_temperature_scaling_recovers_the_temperature():
    from bayestrain.classifier import fit_temperature

    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(4000, 4, generator=g)
    y = torch.multinomial(z.softmax(-1), 1, generator=g)[:, 0]  # calibrated at T = 1 by construction
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0, abs=0.3)  # overconfident by 3x


# ----------------------------------------------------------------------------- MiniLM experiments
MINI = [
    "data.limit_train=8", "data.limit_eval=8", "data.batch_size=4", "data.eval_batch_size=8",
    "data.max_length=16", "trainer.max_epochs=1", "callbacks.progress=null", "logger=csv",
    "scheduler.warmup_steps=1",
]
METRICS = ["val/nll", "val/ece", "val/mce", "val/brier", "val/acc", "val/violation/prior_consistency",
           "val/violation/reversibility", "train/loss_task_epoch", "train/loss_total_epoch"]


@needs_fortunes
@pytest.mark.parametrize("experiment,extra", [
    ("finetune_minilm_fortunes", []),
    ("finetune_minilm_fortunes_constrained", []),
    ("finetune_minilm_fortunes_constrained", ["condition.prior_consistency.mode=lagrangian"]),
    ("finetune_minilm_fortunes_sinkhorn", []),
])
def test_minilm_fortunes_experiments_run_and_log_every_metric(tmp_path, experiment, extra):
    from bayestrain.train import train

    cfg = make_cfg(tmp_path, MINI + [f"experiment={experiment}", "callbacks.checkpoint=null", *extra])
    result = train(cfg)
    val = result["val"]
    keys = METRICS + [f"train/violation/{n}_epoch" for n in cfg.condition]
    keys += [f"train/lambda/{n}" for n, c in cfg.condition.items() if c.mode == "lagrangian"]
    for key in keys:
        assert key in val and val[key] == val[key], key  # present, not NaN
    rows = result["summary"]
    assert len(rows) == 2 and any("temperature scaling" in r for r in rows)
    for r in rows.values():
        assert {"nll", "ece", "mce", "brier", "acc"} <= set(r)
    if experiment.endswith("sinkhorn"):
        module_rows = list(rows.values())[0]
        assert module_rows["violation/reversibility"] < 1e-5  # tied after every step
        assert module_rows["violation/prior_consistency"] < 0.05  # Sinkhorn residual
    assert (tmp_path / "val_reliability.png").read_bytes()[:4] == b"\x89PNG"


@needs_fortunes
def test_minilm_temperature_scaling_experiment_and_eval_of_its_checkpoint(tmp_path):
    from bayestrain.evaluate import evaluate
    from bayestrain.train import train

    cfg = make_cfg(tmp_path, MINI + ["experiment=finetune_minilm_fortunes_ts",
                                     "+callbacks.checkpoint.save_weights_only=true", "callbacks.checkpoint.save_last=false"])
    result = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "calibrated.ckpt", weights_only=True)
    t = float(ckpt["state_dict"]["log_temperature"].exp())
    assert bool(ckpt["state_dict"]["temperature_fitted"]) and t > 0
    scaled = [r for name, r in result["summary"].items() if "temperature scaling" in name][0]
    (tmp_path / "eval").mkdir()
    rows = evaluate(str(tmp_path / "checkpoints" / "calibrated.ckpt"), split="test", output_dir=tmp_path / "eval")
    (name, got), = rows.items()
    assert "temperature scaling" in name
    for k in ("nll", "ece", "mce", "brier", "acc", "violation/prior_consistency", "violation/reversibility"):
        assert got[k] == pytest.approx(scaled[k], abs=1e-5), k
    assert (tmp_path / "eval" / "test_reliability.png").is_file()
    # the fit ran in eval mode with gradients on T only: the weights did not move
    best = next(p for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    w0 = torch.load(best, weights_only=True)["state_dict"]
    w1 = ckpt["state_dict"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("model."))
