"""Concurrent zoo builds (issue 20): processes asking for the same zoo at once share one build, and a finished zoo
is never replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.resources import CONF_DIR
from evomerge.zoo.build import ZooSpec, build_in_stages, zoo_dir

# Each child imports everything, says it is ready and waits for the go file, so both reach the build together; it
# prints the directory it got and that directory's inode.
READY = """
import json, sys, time
from pathlib import Path
sync, home, name, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
{imports}
(sync / f"ready-{{name}}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
{build}
print(json.dumps({{"path": str(path), "inode": path.stat().st_ino}}))
"""
MICRO_CHILD = READY.format(imports="from evomerge.zoo.build import ZooSpec, build_zoo",
                           build="path = build_zoo(ZooSpec.from_dict(spec), home)")
# Toy stages through the same builder the zoos use: each run of the stage appends a line to home/stage_runs.
STAGES_CHILD = READY.format(imports="from evomerge.zoo.build import build_in_stages", build="""
def stage(work):
    with open(home / "stage_runs", "a") as log:
        log.write(name + "\\n")
    time.sleep(2)
    (work / "model").write_text(name)
path = build_in_stages(home / "zoo-toy-0", {"train": stage}, lambda work: {"model": (work / "model").read_text()}, spec)
""")
MICRO = yaml.safe_load((CONF_DIR / "zoo" / "micro.yaml").read_text())


def run_together(tmp_path: Path, child: str, spec: dict) -> list[tuple[str, str]]:
    """Run `child` in two fresh interpreters released at the same moment; (stdout, stderr) of each, both succeeded."""
    sync, home = tmp_path / "sync", tmp_path / "home"
    sync.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}  # the micro test counts bars
    children = [
        subprocess.Popen([sys.executable, "-c", child, str(sync), str(home), name, json.dumps(spec)], env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((sync / f"ready-{name}").exists() for name in ("a", "b")):
        assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a child did not start"
        time.sleep(0.05)
    (sync / "go").touch()
    outputs = [c.communicate(timeout=300) for c in children]
    for c, (_, err) in zip(children, outputs):
        assert c.returncode == 0, err[-3000:]
    return outputs


def check_one_zoo(outputs: list[tuple[str, str]], final: Path) -> None:
    """Both got `final`, still the same directory (nobody replaced it after handing it out), complete; exactly one
    process said it waited, naming the directory and its lock."""
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert {r["path"] for r in results} == {str(final)}
    assert {r["inode"] for r in results} == {final.stat().st_ino}
    assert (final / "zoo_report.json").is_file() and not final.with_name(final.name + ".partial").exists()
    waited = [out for out, _ in outputs if "waiting for another process building" in out]
    assert len(waited) == 1 and str(final) in waited[0] and f"{final.name}.lock" in waited[0], outputs


def test_two_processes_run_the_stages_once(tmp_path):
    outputs = run_together(tmp_path, STAGES_CHILD, {"spec": 1})
    final = tmp_path / "home" / "zoo-toy-0"
    check_one_zoo(outputs, final)
    runs = (tmp_path / "home" / "stage_runs").read_text().split()
    assert len(runs) == 1 and json.loads((final / "zoo_report.json").read_text()) == {"model": runs[0]}


@pytest.mark.slow  # one micro build plus two interpreters' imports: 70-90 s on 2 loaded cores
def test_two_processes_building_the_micro_zoo_share_one_build(tmp_path):
    outputs = run_together(tmp_path, MICRO_CHILD, MICRO)
    check_one_zoo(outputs, zoo_dir(ZooSpec.from_dict(MICRO), tmp_path / "home"))
    assert sum("zoo: base" in err for _, err in outputs) == 1, [err[-1000:] for _, err in outputs]  # base trained once


def test_only_an_incomplete_directory_is_replaced(tmp_path):
    def build(final: Path) -> Path:
        return build_in_stages(final, {"train": lambda work: (work / "model").write_text("new")},
                               lambda work: {"model": "new"}, {})

    stale = tmp_path / "zoo-stale-0"
    (stale / "base").mkdir(parents=True)
    assert build(stale) == stale and (stale / "model").read_text() == "new" and not (stale / "base").exists()
    finished = tmp_path / "zoo-finished-0"
    finished.mkdir()
    (finished / "zoo_report.json").write_text("{}")
    assert build(finished) == finished and not (finished / "model").exists()
    assert (finished / "zoo_report.json").read_text() == "{}"
