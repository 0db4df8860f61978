#!/usr/bin/env bash
# Make .venv from the lock: every runtime and dev dependency at the exact version the tests passed on
# (requirements.lock, the CPU PyTorch wheel included), then evomerge itself, editable, without resolving
# anything more. `bash scripts/lock.sh` refreshes the lock; `bash scripts/check_latest.sh` tries the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup.sh: warning: the lock was compiled for Python 3.11; $(.venv/bin/python --version) may resolve otherwise" >&2
fi
.venv/bin/pip install --quiet -r requirements.lock
.venv/bin/pip install --quiet --no-deps -e .
