#!/usr/bin/env bash
# Refresh requirements.lock from pyproject.toml (runtime + dev extra) and requirements/torch-cpu.in with
# pip-tools' pip-compile, run from a throwaway venv. pip (unlike uv or poetry) takes the CPU PyTorch wheel that
# this project's machines keep on disk. Then run `bash scripts/setup.sh && .venv/bin/python -m pytest` on a
# fresh clone before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet pip-tools==7.6.2
"$tools/bin/pip-compile" --quiet --upgrade --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
    --output-file requirements.lock pyproject.toml requirements/torch-cpu.in
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
