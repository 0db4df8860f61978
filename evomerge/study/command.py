"""`evomerge study`: build (or find) the study zoo, run every merge of the study, and write the summary.

Settings come from `evomerge/conf/study/default.yaml`, with `+study.<key>=...` overrides on top (or `study=<name>`
for another file under evomerge/conf/study/, e.g. `study=quick`). The run writes into Hydra's run directory
(`outputs/study/<date_time>/`), or into `resume=<dir>` to finish a run that was cut short: `results.jsonl` (one line per merge), `summary.json`,
`study.md` (the table and findings) and `study_methods.png`, `study_base_kinds.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.resources import CONF_DIR
from evomerge.study.run import load_pool, run_study
from evomerge.study.summary import plot, pool_info, report_markdown, summarize
from evomerge.zoo.build import reproducible_torch
from evomerge.zoo.report import format_report
from evomerge.zoo.study_zoo import format_study_report


def study_settings(cfg: DictConfig) -> dict[str, Any]:
    settings = yaml.safe_load((CONF_DIR / "study" / "default.yaml").read_text())
    known = set(settings)  # every setting has a default there
    given = OmegaConf.select(cfg, "study")
    if given is not None:  # a given `methods` replaces the default one (to run fewer); `evolved` is merged into it
        given = OmegaConf.to_container(given, resolve=True)
        if isinstance(given.get("evolved"), dict):
            given["evolved"] = {**settings["evolved"], **given["evolved"]}
        settings.update(given)
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"study: unknown setting(s) {sorted(unknown)}")
    return settings


def study(settings: dict[str, Any], home: str | Path, out: Path, log=print) -> dict[str, Any]:
    """Run the study end to end into `out`; returns the summary."""
    pool = load_pool(settings["zoo"], home)
    log(f"study zoo: {pool.zoo}")
    if settings.get("zoo_only"):
        report = json.loads((pool.zoo / "zoo_report.json").read_text())
        log(format_study_report(report) if "kinds" in report else format_report(report))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    with reproducible_torch():  # the zoo's thread count on any machine: the same float sums, the same answers
        records = run_study(pool, settings, out, log=log)
    summary = {**summarize(records, pool_info(pool)), "zoo": str(pool.zoo), "settings": settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(report_markdown(summary))
    plot(summary, out)
    return summary


def study_command(cfg: DictConfig) -> None:
    resume = OmegaConf.select(cfg, "resume")
    out = Path(resume).expanduser() if resume else Path(HydraConfig.get().runtime.output_dir)
    summary = study(study_settings(cfg), cfg.home, out)
    if summary:
        print((out / "study.md").read_text())
        print(f"study: {out}")
