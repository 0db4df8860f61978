"""`evomerge study`: build (or find) the study zoos (one per model size), run every merge, write the summary.

Settings come from `evomerge/conf/study/default.yaml`, with `+study.<key>=...` overrides on top (or `study=<name>`
for another file under evomerge/conf/study/, e.g. `study=quick`, `study=two_sizes`). The run writes into Hydra's run directory
(`outputs/study/<date_time>/`), or into `resume=<dir>` to finish a run that was cut short: `results.jsonl` (one line per merge), `summary.json`,
`study.md` (the table and findings) and `study_methods.png`, `study_base_kinds.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import settings_problem
from evomerge.resources import CONF_DIR
from evomerge.study.run import load_pool, run_study
from evomerge.study.summary import plot, pool_info, report_markdown, summarize
from evomerge.zoo.build import reproducible_torch
from evomerge.zoo.report import format_report
from evomerge.zoo.study_zoo import format_study_report


class EvolvedSettings(BaseModel):
    """The evolutionary column (default.yaml's `evolved` block documents each key)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Any] = {}
    start: dict[str, float]
    generations: int = Field(ge=1)
    popsize: int = Field(ge=2)


class StudySettings(BaseModel):
    """What `evomerge study` accepts (default.yaml documents each key and holds every default)."""

    model_config = ConfigDict(extra="forbid")
    zoos: list[str] = Field(min_length=1)
    sizes: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    subsets: int = Field(ge=1)
    seed: int
    expert_gate: float = Field(ge=0, le=1)
    held_out_min_right: int = Field(ge=0)
    kinds: list[str] | None
    select_split: str
    split: str
    zoo_only: bool
    summarize_only: bool
    methods: dict[str, dict[str, Any] | None]
    evolved: EvolvedSettings | None


def study_settings(cfg: DictConfig) -> dict[str, Any]:
    """default.yaml with the given settings on top: a given `methods` replaces the default one (to run fewer),
    a given `evolved` is merged into it (to change its budget alone); checked, a bad one named in one line."""
    settings = yaml.safe_load((CONF_DIR / "study" / "default.yaml").read_text())
    given = OmegaConf.select(cfg, "study")
    if given is not None:
        given = OmegaConf.to_container(given, resolve=True)
        if isinstance(given.get("evolved"), dict):
            given["evolved"] = {**settings["evolved"], **given["evolved"]}
        settings.update(given)
    try:
        return StudySettings.model_validate(settings).model_dump()
    except ValidationError as error:
        raise ValueError(settings_problem(error, "study.")) from None


def study(settings: dict[str, Any], home: str | Path, out: Path, log=print) -> dict[str, Any]:
    """Run the study end to end into `out`; returns the summary. The first zoo's kinds keep their names (plain,
    it); a later zoo, a second model size, names its kinds `<kind>@<zoo>`."""
    zoos = settings["zoos"]
    pools = [load_pool(zoo, home, settings["expert_gate"], label=None if i == 0 else zoo) for i, zoo in enumerate(zoos)]
    for zoo, pool in zip(zoos, pools):
        log(f"study zoo {zoo}: {pool.zoo} ({pool.parameters:,} parameters)")
        if (pool.held_in, pool.held_out) != (pools[0].held_in, pools[0].held_out):
            raise ValueError(f"study: zoo {zoo} has other tasks than {zoos[0]}; model sizes must share their tasks")
    if settings.get("zoo_only"):
        for pool in pools:
            report = json.loads((pool.zoo / "zoo_report.json").read_text())
            log(format_study_report(report, pool.gate) if "kinds" in report else format_report(report))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    records = []
    with reproducible_torch():  # the zoo's thread count on any machine: the same float sums, the same answers
        for pool in pools:
            records += run_study(pool, settings, out, log=log)
    summary = {**summarize(records, pool_info(list(zip(zoos, pools))),
                                  held_out_min_right=settings["held_out_min_right"]), "settings": settings}
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
