"""scripts/gpu_check.py runs its own code CPU against CPU on a tiny pool (`--smoke`), so the GPU check itself
is exercised where there is no GPU.  Slow: ~80 s on 2 busy cores, mostly imports and compiling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_passes(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--no-search", "--workdir", str(tmp_path)],
                               capture_output=True, text=True, timeout=900)
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert any(line.startswith("OK   merge ties (memory)") for line in lines)
    assert any(line.startswith("OK   disk == memory regmean") for line in lines)
    assert lines[-1].startswith("gpu_check: 0 failed")
