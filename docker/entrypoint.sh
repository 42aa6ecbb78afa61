#!/usr/bin/env bash
# Container entry point.
#   docker run IMAGE [hydra overrides]          -> bayestrain-train [overrides]
#   docker run IMAGE eval ckpt_path=...         -> bayestrain-eval ...
#   docker run IMAGE test                       -> the test suite
#   docker run IMAGE bash                       -> a shell
set -euo pipefail
case "${1:-}" in
  eval) shift; exec bayestrain-eval "$@" ;;
  test) shift; exec python -m pytest -q "$@" ;;
  bash|sh) exec "$@" ;;
  *) exec bayestrain-train "$@" ;;
esac
