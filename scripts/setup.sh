#!/usr/bin/env bash
# Create .venv with the CPU PyTorch wheel first (a bare `torch` requirement can pull a multi-GB CUDA build),
# then install evomerge in editable mode with its dev extra (pytest, hypothesis, mergekit).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[dev]'
