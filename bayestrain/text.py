"""Real text for classification (DESIGN.md section 4): CSV/JSONL files, and the topic-labelled
``fortunes`` corpus of Debian's ``fortunes`` package.

Both data modules yield batches ``{"input_ids": [B, N], "attention_mask": [B, N], "labels":
[B]}`` tokenized by a Hugging Face tokenizer (the model's: ``tokenizer: ${model.pretrained}``),
padded per batch.  ``labels`` (the class names, in index order) is what the model config reads
(``labels: ${data.labels}``).

Splits are deterministic and content-addressed: texts are deduplicated after normalising case
and whitespace, then ordered by the SHA-1 of the normalised text and cut into train /
validation / test fractions (per class), so no text is in two splits and the split does not
depend on file order or on which other classes are chosen.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

__all__ = [
    "FORTUNES_DIR",
    "FORTUNES_TOPICS",
    "normalise",
    "read_labelled_file",
    "load_fortunes",
    "split_by_hash",
    "TextClassificationDataModule",
    "FortunesDataModule",
]

FORTUNES_DIR = "/usr/share/games/fortunes"
#: six topics with 580-1050 entries each, distinct enough to learn, close enough to be confused
FORTUNES_TOPICS = ("computers", "men-women", "politics", "science", "songs-poems", "work")
_INSTALL = "install it with: apt-get install -y fortunes  (Debian/Ubuntu; it provides {dir})"
SPLITS = ("train", "val", "test")


def normalise(text: str) -> str:
    """The key for deduplication and hashing: lower case, whitespace runs collapsed."""
    return " ".join(text.lower().split())


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _hash(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- files
def read_labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                       labels: Sequence | None = None) -> tuple[list[str], list[str]]:
    """Read ``(texts, labels)`` from a ``.csv`` / ``.tsv`` (header row) or ``.jsonl`` / ``.json``
    (one object per line) file.  A missing column, or (when ``labels`` is given) a label outside
    ``labels``, is refused with a message naming it; empty texts are dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = reader.fieldnames or []
            for col, what in ((text_column, "text_column"), (label_column, "label_column")):
                if col not in columns:
                    raise ValueError(
                        f"{path}: no column {col!r} ({what}); the file's columns are {columns}. Set "
                        f"data.{what} to the right name"
                    )
            rows = [(i + 2, r) for i, r in enumerate(reader)]  # line numbers, header = line 1
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not a JSON object ({e})") from e
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: line {i} is not a JSON object")
                for col, what in ((text_column, "text_column"), (label_column, "label_column")):
                    if col not in obj:
                        raise ValueError(
                            f"{path}: line {i} has no column {col!r} ({what}); its keys are {sorted(obj)}. "
                            f"Set data.{what} to the right name"
                        )
                rows.append((i, obj))
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")
    known = None if labels is None else {str(x): str(x) for x in labels}
    texts, ys, empty = [], [], 0
    for line, r in rows:
        text, label = r[text_column], r[label_column]
        if label is None or str(label).strip() == "":
            raise ValueError(f"{path}: line {line} has an empty label (column {label_column!r})")
        label = str(label).strip()
        if known is not None and label not in known:
            raise ValueError(
                f"{path}: line {line}: unknown label {label!r} in column {label_column!r}; the declared "
                f"labels (data.labels) are {list(known)}"
            )
        text = _clean(text if text is not None else "")
        if not text:
            empty += 1
            continue
        texts.append(text)
        ys.append(label)
    if empty:
        warnings.warn(f"{path}: dropped {empty} rows with an empty text", stacklevel=2)
    if not texts:
        raise ValueError(f"{path}: no rows with a non-empty text")
    return texts, ys


def split_by_hash(items: list, fractions: Sequence[float], key=lambda t: t) -> list[list]:
    """Order by SHA-1 of the normalised key and cut into ``len(fractions)`` consecutive parts."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    ordered = sorted(items, key=lambda t: _hash(key(t)))
    n = len(ordered)
    cuts = [round(n * sum(fractions[: i + 1])) for i in range(len(fractions))]
    out, start = [], 0
    for c in cuts:
        out.append(ordered[start:c])
        start = c
    return out


def _dedup(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Drop repeated texts (same normalised text); a text under two labels is dropped entirely.
    Returns (pairs, duplicates dropped, conflicting texts dropped)."""
    seen: dict[str, set] = {}
    for text, y in pairs:
        seen.setdefault(normalise(text), set()).add(y)
    out, kept = [], set()
    for text, y in pairs:
        k = normalise(text)
        if len(seen[k]) > 1 or k in kept:
            continue
        kept.add(k)
        out.append((text, y))
    conflicts = sum(1 for v in seen.values() if len(v) > 1)
    return out, len(pairs) - len(out), conflicts


# ----------------------------------------------------------------------------- fortunes
def _fortune_entries(path: Path) -> list[str]:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    return [_clean(e) for e in re.split(r"^%[ \t]*$", raw, flags=re.M) if _clean(e)]


def available_fortune_topics(corpus_dir: str | Path = FORTUNES_DIR) -> list[str]:
    d = Path(corpus_dir)
    return sorted(p.name for p in d.iterdir() if p.is_file() and not p.suffix and not p.name.startswith("."))


def load_fortunes(topics: Sequence[str] = FORTUNES_TOPICS, corpus_dir: str | Path = FORTUNES_DIR) -> dict[str, list[str]]:
    """``{topic: entries}`` from the corpus folder (one file per topic, entries separated by
    lines holding only ``%``), whitespace-normalised, empty entries dropped, deduplicated
    within and across the chosen topics (a text filed under two topics is dropped)."""
    d = Path(corpus_dir)
    if not d.is_dir() or not any(d.iterdir()):
        raise FileNotFoundError(f"the fortunes corpus is not installed (no folder {d}); " + _INSTALL.format(dir=d))
    topics = [str(t) for t in topics]
    if len(set(topics)) != len(topics) or len(topics) < 2:
        raise ValueError(f"fortunes: give at least two distinct topics, got {topics}")
    pairs = []
    for t in topics:
        f = d / t
        if not f.is_file():
            raise FileNotFoundError(
                f"fortunes topic {t!r} has no file {f}; available topics: {available_fortune_topics(d)} "
                "(or the package is incomplete: " + _INSTALL.format(dir=d) + ")"
            )
        pairs += [(e, t) for e in _fortune_entries(f)]
    pairs, _, _ = _dedup(pairs)
    out = {t: [] for t in topics}
    for text, t in pairs:
        out[t].append(text)
    return out


# ----------------------------------------------------------------------------- data modules
class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        n = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, (x, _) in enumerate(items):
            ids[i, : len(x)] = torch.as_tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in items])}


class TextClassificationDataModule(pl.LightningDataModule):
    """``(text, label)`` classification from CSV/JSONL files.

    Args:
        train_file, val_file, test_file: ``.csv``/``.tsv`` (header row) or ``.jsonl`` files; a
            missing val/test file is carved out of the training file (``val_fraction``,
            ``test_fraction``, deterministic by text hash).  A text in two splits is kept in
            the evaluation one (test, then val) and dropped from training.
        labels: the class names in index order; a label outside them is refused, naming it.
            ``None``: the sorted labels of the training file.
        text_column, label_column: the column (key) names.
        tokenizer: a Hugging Face tokenizer name/folder (``minilm``; normally ``${model.pretrained}``).
        max_length: tokens per text (longer texts are truncated).
        limit_train, limit_eval: keep at most this many texts per split (stratified by hash
            order; for smoke tests).
    """

    def __init__(self, train_file: str | None = None, val_file: str | None = None, test_file: str | None = None,
                 labels: Sequence | None = None, text_column: str = "text", label_column: str = "label",
                 tokenizer: str = "minilm", max_length: int = 128, batch_size: int = 32,
                 eval_batch_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 limit_train: int | None = None, limit_eval: int | None = None, seed: int = 0,
                 num_workers: int = 0, offline: bool | None = None, task=None):
        super().__init__()
        if task is not None:
            raise ValueError(
                f"{type(self).__name__}: text data takes no wind tunnel, got task={type(task).__name__}; "
                "set task=null (the text experiments do)"
            )
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        self.labels = [str(x) for x in labels] if labels is not None else None
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"data.labels has repeated names: {self.labels}")
        self.text_column, self.label_column = text_column, label_column
        self.tokenizer_name, self.max_length = str(tokenizer), int(max_length)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.seed, self.num_workers, self.offline = int(seed), int(num_workers), offline
        self._files = (train_file, val_file, test_file)
        self._fractions = (val_fraction, test_fraction)
        self.texts: dict[str, list[str]] = {}
        self.targets: dict[str, list[int]] = {}
        self._encoded: dict[str, list] = {}
        self._tokenizer = None
        self._load()

    # -- raw splits ------------------------------------------------------------------
    def _read_splits(self) -> dict[str, list[tuple[str, str]]]:
        train_file, val_file, test_file = self._files
        if train_file is None:
            raise ValueError("data.train_file is required (a .csv or .jsonl file with text and label columns)")
        def read(f):
            pairs, dropped, conflicts = _dedup(list(zip(*read_labelled_file(f, self.text_column, self.label_column,
                                                                          self.labels))))
            if conflicts:
                warnings.warn(f"{f}: dropped {conflicts} texts that appear under more than one label", stacklevel=3)
            return pairs

        train = read(train_file)
        if self.labels is None:  # inferred from the training file; val/test are checked against them
            self.labels = sorted({y for _, y in train})
        val = read(val_file) if val_file else None
        test = read(test_file) if test_file else None
        vf, tf = self._fractions
        carve = [x for x, given in (("val", val), ("test", test)) if given is None]
        if carve:
            fr = {"val": vf if val is None else 0.0, "test": tf if test is None else 0.0}
            parts = split_by_hash(train, [1 - fr["val"] - fr["test"], fr["val"], fr["test"]], key=lambda p: p[0])
            train = parts[0]
            val = parts[1] if val is None else val
            test = parts[2] if test is None else test
        return {"train": train, "val": val, "test": test}

    def _load(self) -> None:
        splits = self._read_splits()
        # a text in two splits (or twice) counts once: kept in the evaluation split (test, then
        # val) and dropped from training, so nothing leaks and the given val/test sets stay whole
        seen: set[str] = set()
        for split in reversed(SPLITS):
            kept = []
            for text, y in splits[split]:
                k = normalise(text)
                if k not in seen:
                    seen.add(k)
                    kept.append((text, y))
            limit = self.limit_train if split == "train" else self.limit_eval
            if limit is not None:
                kept = _stratified_head(kept, int(limit))
            if not kept:
                raise ValueError(f"the {split} split is empty")
            index = {y: i for i, y in enumerate(self.labels)}
            self.texts[split] = [t for t, _ in kept]
            self.targets[split] = [index[y] for _, y in kept]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {label: number of texts}}``."""
        return {s: {y: self.targets[s].count(i) for i, y in enumerate(self.labels)} for s in SPLITS}

    # -- tokens ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from bayestrain.hf import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name, self.offline)
        return self._tokenizer

    def _encode(self, split: str) -> list:
        if split not in self._encoded:
            ids = self.tokenizer(self.texts[split], truncation=True, max_length=self.max_length)["input_ids"]
            self._encoded[split] = list(zip(ids, self.targets[split]))
        return self._encoded[split]

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self._encode(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self._encode(split)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(ids) for ids, _ in data]
        if shuffle:
            sampler = _BucketBatchSampler(lengths, self.batch_size, self.seed)
        else:  # evaluation: by length (the metrics do not depend on the order), least padding
            order = sorted(range(len(data)), key=lambda i: (lengths[i], i))
            sampler = [order[i : i + self.eval_batch_size] for i in range(0, len(order), self.eval_batch_size)]
        return DataLoader(data, batch_sampler=sampler, collate_fn=_Collate(pad), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class _BucketBatchSampler:
    """Shuffled batches of similar lengths (less padding): each epoch, a seeded permutation is
    cut into pools of 50 batches, each pool sorted by length and cut into batches, and the
    batches shuffled.  Deterministic given the seed and the epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool: int = 50):
        self.lengths, self.batch_size, self.seed, self.pool = lengths, batch_size, seed, pool
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(perm), size):
            chunk = sorted(perm[start : start + size], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for j in torch.randperm(len(batches), generator=g).tolist():
            yield batches[j]


def _stratified_head(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """At most ``n`` pairs, classes interleaved in hash order (deterministic)."""
    by: dict[str, list] = {}
    for p in sorted(pairs, key=lambda p: _hash(p[0])):
        by.setdefault(p[1], []).append(p)
    out, i = [], 0
    while len(out) < min(n, len(pairs)):
        for y in sorted(by):
            if i < len(by[y]) and len(out) < n:
                out.append(by[y][i])
        i += 1
    return out


class FortunesDataModule(TextClassificationDataModule):
    """The topic-labelled ``fortunes`` corpus (Debian package ``fortunes``): each chosen topic
    file is a class.  Entries are whitespace-normalised, deduplicated (within and across
    topics), and split per topic by text hash into ``fractions`` (train, val, test).

    Args:
        labels: the topics (file names in ``corpus_dir``) = the classes, in index order.
        corpus_dir: the package's data folder (``/usr/share/games/fortunes``).
        fractions: train / validation / test shares (default 0.7 / 0.15 / 0.15).
        max_per_topic: keep at most this many entries per topic (hash order), before splitting.
        Other arguments as :class:`TextClassificationDataModule`.
    """

    def __init__(self, labels: Sequence[str] = FORTUNES_TOPICS, corpus_dir: str = FORTUNES_DIR,
                 fractions: Sequence[float] = (0.7, 0.15, 0.15), max_per_topic: int | None = None, **kw):
        if len(fractions) != 3:
            raise ValueError(f"fractions must be (train, val, test), got {list(fractions)}")
        self.corpus_dir, self.split_fractions = str(corpus_dir), tuple(float(f) for f in fractions)
        self.max_per_topic = max_per_topic
        super().__init__(labels=list(labels), **kw)

    def _read_splits(self) -> dict[str, list[tuple[str, str]]]:
        corpus = load_fortunes(self.labels, self.corpus_dir)
        splits = {s: [] for s in SPLITS}
        for topic, entries in corpus.items():
            if self.max_per_topic is not None:
                entries = sorted(entries, key=_hash)[: int(self.max_per_topic)]
            for split, part in zip(SPLITS, split_by_hash(entries, self.split_fractions)):
                splits[split] += [(t, topic) for t in part]
        return splits
