"""Slow: the full toy zoo's gates and the default search's acceptance, on the zoo `evomerge search` itself uses.

The zoo is built once into the evomerge home (EVOMERGE_HOME, default ~/.cache/evomerge) and found there again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.resources import CONF_DIR
from evomerge.zoo.build import ZooSpec, build_zoo
from evomerge.zoo.report import GATES, gate_results

pytestmark = pytest.mark.slow
HOME = Path(os.environ.get("EVOMERGE_HOME", "~/.cache/evomerge")).expanduser()


@pytest.fixture(scope="module")
def report() -> dict:
    spec = ZooSpec.from_dict(yaml.safe_load((CONF_DIR / "zoo" / "full.yaml").read_text()))
    return json.loads((build_zoo(spec, HOME) / "zoo_report.json").read_text())


def test_the_default_zoo_passes_every_gate(report):
    probe = report["merge_probe"]
    assert probe["chosen_on"] == "search" and probe["tasks"]["toy_two_skill"]["split"] == "test"
    assert gate_results(report) == dict.fromkeys(GATES, True)


def test_default_search_beats_every_source_and_uniform_baseline_on_test(tmp_path):
    main(["search", f"home={HOME}", f"hydra.run.dir={tmp_path}", "progress=false"])
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    best = next(r for r in rows if r["kind"] == "best")["metrics"]["fitness"]
    others = {r["name"]: r["metrics"]["fitness"] for r in rows if r["kind"] != "best"}
    assert all(best > fitness for fitness in others.values()), (best, others)
