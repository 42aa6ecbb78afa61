#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what is needed,
# then runs the main job or the tests.
#   bash scripts/dev.sh train [hydra overrides]   # the main job (default config)
#   bash scripts/dev.sh test  [pytest args]       # the test suite
#   bash scripts/dev.sh setup                     # only install
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BAYESTRAIN_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.bayestrain-installed"
  local want
  want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: where no NVIDIA GPU is visible this takes the CPU wheel; an
  # unpinned torch would pull a multi-GB CUDA build through the project's dependencies.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    else
      "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" \
        || "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev,hf,sweeps]"
  echo "$want" > "$stamp"
}

# The real-text corpus (Debian's `fortunes`, topic-labelled short texts) for the fine-tuning
# experiments and their tests; best effort, the tests that need it say how to install it.
corpus() {
  [ -d /usr/share/games/fortunes ] && return
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq fortunes) >/dev/null 2>&1 \
      || echo "note: could not install Debian's fortunes package (apt-get install -y fortunes)" >&2
  fi
}

cmd=${1:-train}; shift || true
case "$cmd" in
  setup) setup ;;
  train) setup; exec "$VENV/bin/python" -m bayestrain.train "$@" ;;
  test)
    setup
    corpus
    # the Triton interpreter tests run in a process of their own (TRITON_INTERPRET must be set
    # before triton is imported, and they are the slowest part)
    "$VENV/bin/python" -m pytest -q -m "not kernels" "$@"
    if ls tests/test_kernels.py >/dev/null 2>&1; then
      "$VENV/bin/python" -m pytest -q -m kernels tests/test_kernels.py "$@"
    fi
    ;;
  *) echo "usage: bash scripts/dev.sh {train|test|setup} [args]" >&2; exit 2 ;;
esac
