"""Experiment trackers: a search's progress in Weights & Biases (`tracker=wandb`) or TensorBoard
(`tracker=tensorboard`); off by default (`tracker=none`, `run.NoTracker`).

Each generation is one step (its number in log.jsonl), with what `run.generation_metrics` reads from the log; at the
end of a stage come the recipe it reports (an artifact in W&B, text in TensorBoard) and the held-out report (a
table). Every search stage's run directory holds `tracker.json`: per tracker kind, the run it started (W&B's run
id, TensorBoard's log directory) and how many generations that run has logged -- so `resume=<run dir>` continues
the same tracker run, with the settings it started with, and logs every generation once: none of those the
checkpoint replays, and any that a kill left checkpointed but not yet logged. The libraries are imported only when
a tracker is chosen (`pip install 'evomerge[trackers]'`).
"""

from __future__ import annotations

import importlib
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import SearchError, settings_problem
from evomerge.modelio import error_line
from evomerge.search.run import NoTracker, Tracker, write_json_atomic

TRACKER_FILE = "tracker.json"


class NoTrackerSettings(BaseModel):
    """`tracker=none`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kind: Literal["none"]


class WandbSettings(BaseModel):
    """`tracker=wandb` (evomerge/conf/tracker/wandb.yaml)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kind: Literal["wandb"]
    project: str = Field("evomerge", min_length=1)
    entity: str | None = None  # None: the W&B account's default
    group: str | None = None  # None: a multirun's sweep directory (its jobs grouped together); a single run: none
    name: str | None = None  # None: the run directory
    mode: Literal["online", "offline", "disabled"] = "online"


class TensorBoardSettings(BaseModel):
    """`tracker=tensorboard` (evomerge/conf/tracker/tensorboard.yaml)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kind: Literal["tensorboard"]
    log_dir: str = Field("tensorboard", min_length=1)  # relative paths: inside the (stage's) run directory


TrackerSettings = NoTrackerSettings | WandbSettings | TensorBoardSettings
MODELS: dict[str, type[TrackerSettings]] = {"none": NoTrackerSettings, "wandb": WandbSettings,
                                            "tensorboard": TensorBoardSettings}
LIBRARIES = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}  # what each tracker imports


def tracker_settings(settings: Mapping[str, Any]) -> TrackerSettings:
    """The `tracker` config group's settings, checked before a search starts: a bad setting, or a tracker whose
    library is not installed, is one line naming it."""
    settings = dict(settings)
    kind = settings.get("kind")
    model = MODELS.get(kind)
    if model is None:
        raise SearchError(f"tracker.kind={kind!r}: use tracker=none, tracker=wandb or tracker=tensorboard")
    try:
        checked = model(**settings)
    except ValidationError as error:
        raise SearchError(settings_problem(error, "tracker.")) from None
    if kind in LIBRARIES:
        _library(kind)
    return checked


def _library(kind: str) -> ModuleType:
    try:
        return importlib.import_module(LIBRARIES[kind])
    except ImportError:
        raise SearchError(f"tracker={kind} needs the {kind} package: pip install 'evomerge[trackers]'") from None


def open_tracker(settings: TrackerSettings, run_dir: Path, config: Mapping[str, Any],
                 sweep: str | None = None) -> Tracker:
    """The tracker of the search in `run_dir`: the run that `tracker.json` names for this kind, or a new one.
    `config` is the run's resolved config (W&B shows it beside the run); `sweep` names a multirun, whose jobs W&B
    groups under it unless `tracker.group` is set."""
    if isinstance(settings, WandbSettings):
        return WandbTracker(settings, run_dir, config, sweep)
    if isinstance(settings, TensorBoardSettings):
        return TensorBoardTracker(settings, run_dir)
    return NoTracker()


def report_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A held-out report's rows as a table: model, kind, every scalar metric (fitness first), parameters, path
    length; a value a row lacks is None."""
    flat = [{"model": row["name"], "kind": row["kind"],
             **{key: value for key, value in row["metrics"].items() if isinstance(value, (bool, int, float, str))},
             "params": row["params"], "path_length": row["path_length"]} for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    return columns, [[row.get(column) for column in columns] for row in flat]


class _RecordedRun:
    """A tracker run recorded in `tracker.json` under its kind, with the generations it has logged: the one
    recorded there, or `fresh` (recorded once it has started: `_save`)."""

    kind: str

    def __init__(self, run_dir: Path, fresh: dict[str, Any]):
        self.path = run_dir / TRACKER_FILE
        self.runs = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        self.run = self.runs.get(self.kind) or {**fresh, "logged": 0}

    @property
    def logged(self) -> int:
        return self.run["logged"]

    def _logged_through(self, step: int) -> None:
        self.run["logged"] = step + 1
        self._save()

    def _save(self) -> None:
        self.runs[self.kind] = self.run
        write_json_atomic(self.path, self.runs)


class WandbTracker(_RecordedRun):
    """A W&B run under an id of our own, which `resume=<run dir>` continues; its local files go to
    `<run dir>/wandb/` (an offline run is uploaded with `wandb sync <run dir>/wandb/offline-run-*`). The report
    table goes to the run's summary, which takes no step, so a resumed run can still log the generations after it."""

    kind = "wandb"

    def __init__(self, settings: WandbSettings, run_dir: Path, config: Mapping[str, Any], sweep: str | None):
        self.wandb = _library("wandb")
        super().__init__(run_dir, {"id": secrets.token_hex(8), "project": settings.project,
                                   "entity": settings.entity, "group": settings.group or sweep,
                                   "name": settings.name or str(run_dir)})
        try:
            self.wandb_run = self.wandb.init(
                id=self.run["id"], resume="allow", project=self.run["project"], entity=self.run["entity"],
                group=self.run["group"], name=self.run["name"], mode=settings.mode, dir=run_dir, config=dict(config))
        except self.wandb.Error as error:  # not logged in, no network, no such entity, ...
            raise SearchError(f"tracker=wandb: cannot start the W&B run: {error_line(error)}") from None
        self._save()

    def generation(self, step: int, metrics: Mapping[str, float]) -> None:
        self.wandb_run.log(dict(metrics), step=step)
        self._logged_through(step)

    def artifact(self, path: Path) -> None:
        artifact = self.wandb.Artifact(f"recipe-{self.run['id']}", type="recipe")
        artifact.add_file(str(path))
        self.wandb_run.log_artifact(artifact)

    def table(self, rows: Sequence[Mapping[str, Any]]) -> None:
        columns, data = report_table(rows)
        self.wandb_run.summary["test_report"] = self.wandb.Table(columns=columns, data=data)

    def close(self) -> None:
        self.wandb_run.finish()


class TensorBoardTracker(_RecordedRun):
    """Event files in `<run dir>/<log_dir>`; a resumed run's writer purges every event at or after the first
    generation it logs (one a killed process logged but did not record), and writes the recipe and the report as
    text at the step after the last generation."""

    kind = "tensorboard"

    def __init__(self, settings: TensorBoardSettings, run_dir: Path):
        super().__init__(run_dir, {"log_dir": settings.log_dir})
        self.writer = _library("tensorboard").SummaryWriter(str(run_dir / self.run["log_dir"]),
                                                            purge_step=self.logged)
        self._save()

    def generation(self, step: int, metrics: Mapping[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        self._logged_through(step)

    def artifact(self, path: Path) -> None:
        text = Path(path).read_text(encoding="utf-8")
        self.writer.add_text("recipe", "".join(f"    {line}\n" for line in text.splitlines()), self.logged)

    def table(self, rows: Sequence[Mapping[str, Any]]) -> None:
        columns, data = report_table(rows)
        cell = lambda value: "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)  # noqa: E731
        lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
        lines += [" | ".join(cell(value) for value in row) for row in data]
        self.writer.add_text("test_report", "\n".join(lines), self.logged)

    def close(self) -> None:
        self.writer.close()
