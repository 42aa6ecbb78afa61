"""Test-wide environment.  Set before anything imports triton (Lightning does): on a machine
without CUDA, Triton kernels run in interpreter mode."""
import os

try:  # cheap CUDA probe without importing torch first would be nicer, but torch is needed anyway
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
