"""`evomerge zoo`: build or find the toy zoo and print its report as a table."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from evomerge.zoo.build import ZooSpec, build_zoo
from evomerge.zoo.report import format_report


def zoo_command(cfg: DictConfig) -> None:
    spec = ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True))
    path = build_zoo(spec, cfg.home)
    report = json.loads((path / "zoo_report.json").read_text())
    print(f"zoo: {path}")
    print(format_report(report))
