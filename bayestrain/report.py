"""Plain-text summaries printed at the end of a run and by ``bayestrain-eval``."""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

# the columns a wind-tunnel summary shows, in order, with their units
COLUMNS = [
    ("bayes_gap_bits", "bayes gap (bits/tok)"),
    ("nll", "NLL (nats/tok)"),
    ("ece", "ECE"),
    ("mce", "MCE"),
    ("brier", "Brier"),
    ("acc", "acc"),
]


def summary_table(rows: dict[str, dict], title: str = "") -> str:
    """Render ``{predictor name: {metric: value}}`` as a fixed-width table (a string)."""
    keys = [k for k, _ in COLUMNS if any(k in r for r in rows.values())]
    keys += sorted({k for r in rows.values() for k in r if k.startswith("violation/")})
    table = Table(title=title or None)
    table.add_column("predictor")
    labels = dict(COLUMNS)
    for k in keys:
        table.add_column(labels.get(k, k), justify="right")
    for name, r in rows.items():
        table.add_row(name, *[_fmt(r.get(k)) for k in keys])
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False).print(table)
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def update_docs(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section of a Markdown file between ``<!-- key:start -->`` and
    ``<!-- key:end -->``: a benchmark's ``--write-docs`` rewrites its own section only."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    body = path.read_text() if path.exists() else "# Results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        before, rest = body.split(start, 1)
        body = before + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners (GPU/TPU availability, tips, 'max_steps reached'):
    benchmark scripts fit many short runs and print their own tables."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*val_check_interval.*")
