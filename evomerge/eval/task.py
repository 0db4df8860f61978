"""Tasks as data: each `evomerge/tasks/<name>.yaml` names its data per split, its prompt template, its scorer
and its primary metric; this module loads them, reads their data, builds prompts and scores generations.

A task is named either by its bare name (looked up in `tasks_dir`, then in the packaged tasks) or by the
path of a YAML file of one's own (`task.name=$HOME/my_tasks/qa.yaml`); inside a file, `extends:` and
`components:` names are looked up in that file's directory first, then in the packaged tasks.

A split is read from a local TSV (`question<TAB>answer`, no header) or JSONL (`{"question", "answer"}`
per line) when that file exists, and otherwise from the hub (`datasets.load_dataset`) when the split names
a hub dataset, so offline machines and tests never touch the network. Paths may use `${variable}`; a
task's YAML can give defaults under `variables:`, the caller's mapping overrides them, `${tasks_dir}`
is always the directory holding the YAML and `${evomerge_data}` the data shipped with evomerge
(`evomerge/data`, e.g. the MGSM test sets). A local path that comes out empty (its variable's default is
"") means no local file was given: the hub dataset is used. `CONFIG_VARIABLES` are the task variables that
are also top-level settings of the config (`evomerge eval|search mgsm_dir=...`).

A split may name splits it must never share a question with (`disjoint_from: [test]`): its rows are then
checked against theirs (after Unicode NFKC and whitespace normalisation) each time it is read, so a search
set that overlaps the test set is refused before anything is scored on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import reprlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from typing_extensions import Self

from evomerge.eval.language import is_japanese, japanese_probabilities
from evomerge.eval.scoring import (
    Number,
    extract_last_number,
    first_line,
    numbers_match,
    parse_gold_number,
    phrase_in_first_line,
)
from evomerge.errors import TaskError
from evomerge.resources import DATA_DIR, TASKS_DIR

TASK_FILE_SUFFIXES = (".yaml", ".yml")  # a task name ending in one of these is the path of a task file
Scorer = Literal["last_number", "phrase_first_line"]
Metric = Literal["acc", "acc_ja", "ja_rate"]
SCORERS: tuple[str, ...] = get_args(Scorer)
SAMPLE_METRICS: tuple[str, ...] = get_args(Metric)
OUTCOMES = {"acc": "correct", "acc_ja": "correct_ja", "ja_rate": "is_japanese"}  # metric -> its per-row outcome
# Task variables that are also top-level config settings, passed to every task a command loads (eval, search).
CONFIG_VARIABLES = ("mgsm_dir", "mgsm_search_file")
_VARIABLE = re.compile(r"\$\{(\w+)\}")
_TEMPLATE_FIELD = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class Example:
    question: str
    answer: str


@dataclass(frozen=True)
class SplitData:
    """The rows of one split and where they were read from (a file path or `hub:<dataset>`)."""

    split: str
    examples: tuple[Example, ...]
    source: str


@dataclass(frozen=True)
class SampleScore:
    extracted: Number | str | None  # the number read from the generation, or its first line for phrase tasks
    correct: bool
    japanese_prob: float

    @property
    def is_japanese(self) -> bool:
        return is_japanese(self.japanese_prob)

    @property
    def correct_ja(self) -> bool:
        return self.correct and self.is_japanese

    def outcome(self, metric: str) -> bool:
        """This row's 0/1 outcome in a sample metric: the metric is its mean over the rows."""
        return bool(getattr(self, OUTCOMES[metric]))


class _Schema(BaseModel):
    """A section of a task YAML: strict types (4, not '4'), and a misspelt key refused with the allowed ones."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        unknown = sorted(map(str, set(data) - set(cls.model_fields))) if isinstance(data, dict) else []
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(cls.model_fields)}")
        return data

    @classmethod
    def load(cls, config: dict[str, Any], path: Path) -> Self:
        """Validate `config` read from `path`; pydantic's first problem becomes one TaskError line naming the file
        and the key path (`<file>: <key path>: <what is wrong>`), not pydantic's multi-line dump."""
        try:
            return cls.model_validate(config)
        except ValidationError as error:
            problems = error.errors(include_url=False)
        first, more = problems[0], f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        if first["type"] == "missing":
            raise TaskError(f"{path}: missing required key {key!r}{more}")
        if first["type"] == "value_error":  # our validators' own messages, without pydantic's "Value error, "
            what = str(first["ctx"]["error"])
        else:  # pydantic's class names mean nothing to whoever wrote the YAML
            what = f"{first['msg'].split(' or instance of ')[0]}, got {reprlib.repr(first['input'])}"
        raise TaskError(f"{path}: {key + ': ' if key else ''}{what}{more}")


class HubSource(_Schema):  # datasets.load_dataset(path, name, split=split)
    path: str
    name: str | None = None
    split: str | None = None  # None: the task split's own name
    question_field: str = "question"
    answer_field: str = "answer"


class SplitSource(_Schema):
    local: str | None = None  # may hold ${variables}; resolved when the split is read
    hub: HubSource | None = None
    # splits that must share no question with this one; `disjoint_from: test` is short for `[test]`
    disjoint_from: Annotated[
        tuple[str, ...], Field(strict=False), BeforeValidator(lambda v: [v] if isinstance(v, str) else v or ())
    ] = ()


class PromptSpec(_Schema):
    template: str


class GenerationSpec(_Schema):
    max_new_tokens: int
    stop: list[Annotated[str, Field(min_length=1)]] = []


class FewshotSpec(_Schema):
    path: str  # a JSON file of exemplars; may hold ${variables}
    example_template: str
    insert_before: str  # the exemplars go before its first occurrence in prompt.template
    question_field: str = "q"
    answer_field: str = "a"


class TaskSpec(_Schema):
    """A plain task's YAML (after `extends:` is merged in)."""

    name: str
    description: str | None = None
    variables: dict[str, Any] | None = None  # defaults for ${variables}; each value is used as its str()
    scorer: Scorer  # fields in the order their problems are reported
    prompt: PromptSpec
    fewshot: FewshotSpec | None = None
    generation: GenerationSpec
    splits: dict[str, SplitSource] = Field(min_length=1)
    primary_metric: Metric

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        """What no single key can check: a {question} to fill, a source per split, the splits they name."""
        if "{question}" not in self.prompt.template:
            raise ValueError("prompt.template has no {question} placeholder")
        if self.fewshot is not None and self.fewshot.insert_before not in self.prompt.template:
            raise ValueError(f"fewshot.insert_before {self.fewshot.insert_before!r} does not occur in prompt.template")
        for split, source in self.splits.items():
            if source.local is None and source.hub is None:
                raise ValueError(f"splits.{split} needs 'local' and/or 'hub'")
            for other in source.disjoint_from:
                if other == split or other not in self.splits:
                    raise ValueError(f"splits.{split}.disjoint_from names {other!r}, not another split of this task "
                                     f"({sorted(self.splits)})")
        return self


class ComponentSpec(_Schema):
    task: str
    metric: Metric


class CompositeSpec(_Schema):
    """A composite task's YAML: a YAML with `components:` is one."""

    name: str
    description: str | None = None
    components: list[ComponentSpec] = Field(min_length=1)


def _fill_template(template: str, **fields: str) -> str:
    """Substitute {question}/{answer} in one pass, so braces inside the inserted text are left alone."""
    return _TEMPLATE_FIELD.sub(lambda match: fields[match.group(1)], template)


@dataclass(eq=False)
class Task:
    """One scored task: prompts from a template, generations scored by `scorer`, fitness = `primary_metric`."""

    name: str
    config_path: Path
    template: str
    scorer: str
    primary_metric: str
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    splits: dict[str, SplitSource]
    variables: dict[str, str]
    fewshot_prefix: str = ""  # already placed inside `template` when the task was loaded
    fingerprint: str = ""

    def __repr__(self) -> str:
        return f"Task({self.name!r}, splits={sorted(self.splits)}, metric={self.primary_metric!r})"

    def build_prompt(self, question: str) -> str:
        return _fill_template(self.template, question=question)

    def load_split(self, split: str) -> SplitData:
        """The split's rows: the local file if it exists, else the hub dataset, else a TaskError naming both;
        then refused if it shares a question with a split it must be disjoint from."""
        source = self._split_source(split)
        data = self._read_split(split, source)
        for other in source.disjoint_from:  # read as they are (their own disjoint_from is checked when they are loaded)
            self._check_disjoint(data, self._read_split(other, self._split_source(other)))
        return data

    def missing_variables(self, split: str) -> list[str]:
        """The variables the split's local path uses that are not set (e.g. `zoo_dir` before the zoo is built):
        its data cannot be read until they are."""
        local = self._split_source(split).local
        return [name for name in _VARIABLE.findall(local or "") if name not in self.variables]

    def _read_split(self, split: str, source: SplitSource) -> SplitData:
        where = f"task {self.name!r} split {split!r} ({self.config_path})"
        problems = []
        if source.local is not None:
            resolved = _resolve_variables(source.local, self.variables, f"{where}, splits.{split}.local")
            if not resolved.strip():  # its variable left empty: no local file given
                names = _VARIABLE.findall(source.local)
                problems.append("no local file given" + (
                    f" (set {names[0]}=<a .jsonl or .tsv file of question/answer rows>)" if names else ""))
            else:
                path = Path(resolved).expanduser().resolve()
                if path.is_file():
                    examples = _read_local_rows(path, numeric_answers=self.scorer == "last_number")
                    return SplitData(split, examples, str(path))
                problems.append(f"data file {path} does not exist")
        if source.hub is not None:
            hub = source.hub.model_copy(update={"split": source.hub.split or split})
            label = f"hub:{hub.path}" + (f"/{hub.name}" if hub.name else "")
            try:
                return SplitData(split, _read_hub_rows(hub, self.scorer == "last_number"), label)
            except TaskError as error:  # the dataset loaded but its rows do not fit the task
                problems.append(str(error))
            except Exception as error:  # offline, unknown dataset: report it with the rest
                problems.append(_hub_problem(hub, error))
        raise TaskError(f"no data for {where}: " + "; ".join(problems))

    def _check_disjoint(self, data: SplitData, other: SplitData) -> None:
        """Refuse `data` when one of its questions is also one of `other`'s (search and test must not overlap)."""
        theirs = {_normalise_question(example.question) for example in other.examples}
        shared = [index for index, example in enumerate(data.examples, start=1)
                  if _normalise_question(example.question) in theirs]
        if shared:
            first = data.examples[shared[0] - 1].question
            raise TaskError(
                f"task {self.name!r}: split {data.split!r} ({data.source}) shares {len(shared)} question(s) with split "
                f"{other.split!r} ({other.source}), the first at row {shared[0]}: {first[:40]!r}{'...' if len(first) > 40 else ''}; "
                f"{data.split} and {other.split} must not overlap: remove those rows or give another file"
            )

    def _split_source(self, split: str) -> SplitSource:
        if split not in self.splits:
            raise TaskError(
                f"task {self.name!r} has no split {split!r}; its splits are {sorted(self.splits)} ({self.config_path})"
            )
        return self.splits[split]

    def score(self, generations: Sequence[str], golds: Sequence[str]) -> list[SampleScore]:
        """Score each generation against its gold; the Japanese probability is on the whole generation."""
        if len(generations) != len(golds):
            raise ValueError(f"{len(generations)} generations for {len(golds)} gold answers")
        probabilities = japanese_probabilities(generations)
        scores = []
        for generation, gold, probability in zip(generations, golds, probabilities):
            if self.scorer == "last_number":
                extracted: Number | str | None = extract_last_number(generation)
                correct = numbers_match(extracted, parse_gold_number(gold))
            else:
                extracted = first_line(generation)
                correct = phrase_in_first_line(generation, gold)
            scores.append(SampleScore(extracted, correct, probability))
        return scores

    def metric_names(self) -> list[str]:
        """The numeric metrics an evaluation yields (what a search may name as an objective)."""
        return [*SAMPLE_METRICS, "n", "tokens", "score"]

    def metrics(self, scores: Sequence[SampleScore], split: str, tokens: int | None = None) -> dict[str, Any]:
        """acc, acc_ja, ja_rate, n, the split, and `score` = the primary metric (the search fitness); `tokens`
        (the answers' generated tokens, what an evaluation cost) where the caller counted them."""
        n = len(scores)
        if n == 0:
            raise ValueError(f"no samples to score for task {self.name!r} split {split!r}")
        metrics: dict[str, Any] = {metric: sum(s.outcome(metric) for s in scores) / n for metric in SAMPLE_METRICS}
        metrics["n"] = n
        if tokens is not None:
            metrics["tokens"] = tokens
        metrics["score"] = metrics[self.primary_metric]
        metrics["split"] = split
        return metrics


@dataclass(frozen=True)
class Component:
    task: Task
    metric: str


@dataclass(eq=False)
class CompositeTask:
    """Several (task, metric) components; `score` is their mean, and each component's metrics are kept as
    `<task>/<metric>` so a multi-objective search can read the objectives separately."""

    name: str
    config_path: Path
    components: tuple[Component, ...]
    fingerprint: str = ""
    primary_metric: ClassVar[str] = "score"

    def __repr__(self) -> str:
        return f"CompositeTask({self.name!r}, components={[(c.task.name, c.metric) for c in self.components]})"

    @property
    def objective_names(self) -> list[str]:
        return [f"{c.task.name}/{c.metric}" for c in self.components]

    def metric_names(self) -> list[str]:
        """The pooled metrics, then each component's as `<task>/<metric>` (what a search may name as an objective)."""
        own = [*SAMPLE_METRICS, "n", "tokens", "score"]
        return own + [f"{c.task.name}/{key}" for c in self.components for key in own]

    def combine(self, component_metrics: Mapping[str, Mapping[str, Any]], split: str) -> dict[str, Any]:
        """`score` = mean of the component metrics; acc/acc_ja/ja_rate pooled over all samples; n = total."""
        total = sum(m["n"] for m in component_metrics.values())
        metrics: dict[str, Any] = {
            key: sum(m[key] * m["n"] for m in component_metrics.values()) / total for key in SAMPLE_METRICS
        }
        metrics["n"] = total
        if all("tokens" in m for m in component_metrics.values()):
            metrics["tokens"] = sum(m["tokens"] for m in component_metrics.values())
        objectives = [component_metrics[c.task.name][c.metric] for c in self.components]
        metrics["score"] = sum(objectives) / len(objectives)
        metrics["split"] = split
        for task_name, task_metrics in component_metrics.items():
            for key, value in task_metrics.items():
                if key != "split":
                    metrics[f"{task_name}/{key}"] = value
        return metrics


AnyTask = Task | CompositeTask


def plain_tasks(task: AnyTask) -> list[Task]:
    """The plain tasks `task` is scored on, each once (a composite may name one task with two metrics)."""
    tasks = [component.task for component in task.components] if isinstance(task, CompositeTask) else [task]
    return list({plain.name: plain for plain in tasks}.values())


def check_objectives(objectives: Sequence[str], task: AnyTask, extra: Sequence[str] = ()) -> None:
    """Refuse objectives (a leading '-' minimises) that name no metric of the task, before any candidate runs."""
    known = task.metric_names() + list(extra)
    for objective in objectives:
        if str(objective).removeprefix("-") not in known:
            raise TaskError(f"unknown metric {objective!r} in search.objectives: task {task.name!r} yields {known}")


def available_tasks(tasks_dir: str | Path = TASKS_DIR) -> list[str]:
    return sorted(path.stem for path in Path(tasks_dir).glob("*.yaml"))


def load_task(name: str, variables: Mapping[str, Any] | None = None, tasks_dir: str | Path = TASKS_DIR) -> AnyTask:
    """Load task `name`: `<tasks_dir>/<name>.yaml`, else the packaged `evomerge/tasks/<name>.yaml`; a name
    ending in .yaml/.yml is the task file's own path (`~` expanded, relative to the current directory).
    `variables` fills `${...}` in data paths (e.g. {"zoo_dir": ...}); unset ones are only an error when a
    split that needs them is read."""
    config, path = _read_config(name, _search_dirs(tasks_dir))
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    if "components" not in config:
        return _build_task(TaskSpec.load(config, path), path, variables or {}, fingerprint)
    components = []
    for index, entry in enumerate(CompositeSpec.load(config, path).components):
        task = load_task(entry.task, variables, path.parent)
        if not isinstance(task, Task):
            raise TaskError(f"{path}: components[{index}].task {entry.task!r} is itself a composite; "
                            "nest only plain tasks")
        components.append(Component(task, entry.metric))
    return CompositeTask(path.stem, path, tuple(components), fingerprint)


def _search_dirs(first: str | Path) -> tuple[Path, ...]:
    """Where a bare task name is looked up: `first`, then the packaged tasks."""
    return tuple(dict.fromkeys([Path(first).expanduser().resolve(), TASKS_DIR.resolve()]))


def _find_task(name: str, search_dirs: tuple[Path, ...]) -> Path:
    if str(name).endswith(TASK_FILE_SUFFIXES):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return path
    for directory in search_dirs:
        path = directory / f"{name}.yaml"
        if path.is_file():
            return path
    known = "; ".join(f"in {directory}: {available_tasks(directory)}" for directory in search_dirs)
    raise TaskError(f"unknown task {name!r} (or the path of a task .yaml file); known tasks {known}")


def _read_config(name: str, search_dirs: tuple[Path, ...], seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """The task's YAML as a dict, with `extends: <base>` merged in (this file's keys win, mappings merge)."""
    path = _find_task(name, search_dirs)
    name = path.stem
    with path.open(encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise TaskError(f"{path}: expected a mapping at the top level")
    if config.get("name") != name:
        raise TaskError(f"{path}: 'name' is {config.get('name')!r} but the file is named {name!r}")
    base_name = config.pop("extends", None)
    if base_name is None:
        return config, path
    if base_name in seen + (name,):
        raise TaskError(f"{path}: 'extends' forms a cycle through {base_name!r}")
    base, _ = _read_config(base_name, _search_dirs(path.parent), seen + (name,))
    return _deep_merge(base, config), path


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build_task(spec: TaskSpec, path: Path, caller_variables: Mapping[str, Any], fingerprint: str) -> Task:
    variables = {"tasks_dir": str(path.parent), "evomerge_data": str(DATA_DIR)}
    variables.update({key: str(value) for key, value in (spec.variables or {}).items()})
    variables.update({key: str(value) for key, value in caller_variables.items() if value is not None})
    variables = {key: _resolve_variables(value, variables, f"{path} variable {key!r}") for key, value in variables.items()}
    template, fewshot_prefix = spec.prompt.template, ""
    if spec.fewshot is not None:
        template, fewshot_prefix = _insert_fewshot(template, spec.fewshot, variables, path)
    return Task(
        name=path.stem,
        config_path=path,
        template=template,
        scorer=spec.scorer,
        primary_metric=spec.primary_metric,
        max_new_tokens=spec.generation.max_new_tokens,
        stop_strings=tuple(spec.generation.stop),
        splits=dict(spec.splits),
        variables=variables,
        fewshot_prefix=fewshot_prefix,
        fingerprint=fingerprint,
    )


def _insert_fewshot(template: str, fewshot: FewshotSpec, variables: Mapping[str, str], path: Path) -> tuple[str, str]:
    """Render the exemplars with `example_template` and insert them before the first `insert_before` marker
    of the zero-shot template, so the zero-shot text itself is reused unchanged."""
    exemplar_path = Path(_resolve_variables(fewshot.path, variables, f"{path} fewshot.path"))
    exemplars = _read_exemplars(exemplar_path, fewshot.question_field, fewshot.answer_field)
    prefix = "".join(_fill_template(fewshot.example_template, question=e.question, answer=e.answer) for e in exemplars)
    position = template.find(fewshot.insert_before)
    return template[:position] + prefix + template[position:], prefix


def _read_exemplars(path: Path, question_field: str, answer_field: str) -> list[Example]:
    """Exemplars from a JSON list, or from `{"exemplars": {"1": {...}, ...}}` (MGSM's layout) in key order."""
    if not path.is_file():
        raise TaskError(f"few-shot exemplar file {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("exemplars", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = [entries[key] for key in sorted(entries, key=lambda key: int(key) if key.isdigit() else key)]
    examples = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get(question_field), str) or not isinstance(
            entry.get(answer_field), str
        ):
            raise TaskError(f"{path}: exemplar {index} lacks string fields {question_field!r} and {answer_field!r}")
        examples.append(Example(entry[question_field], entry[answer_field]))
    if not examples:
        raise TaskError(f"{path}: no exemplars")
    return examples


def _read_local_rows(path: Path, numeric_answers: bool) -> tuple[Example, ...]:
    if path.suffix not in (".tsv", ".jsonl"):
        raise TaskError(f"data file {path}: unsupported format {path.suffix!r}; use .tsv or .jsonl")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            example = _parse_row(line, path.suffix, f"{path} line {line_number}")
            if numeric_answers:
                try:
                    parse_gold_number(example.answer)
                except ValueError as error:
                    raise TaskError(f"{path} line {line_number}: {error}") from None
            examples.append(example)
    if not examples:
        raise TaskError(f"data file {path} has no rows (empty split)")
    return tuple(examples)


def _parse_row(line: str, suffix: str, where: str) -> Example:
    if suffix == ".tsv":
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise TaskError(f"{where}: expected 'question<TAB>answer', got {len(fields)} field(s): {line[:80]!r}")
        return Example(fields[0], fields[1].strip())
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise TaskError(f"{where}: expected an object with string 'question' and 'answer', got {line[:80]!r}")
    if not row["question"].strip() or not row["answer"].strip():
        raise TaskError(f"{where}: empty 'question' or 'answer'")
    return Example(row["question"], row["answer"].strip())


def _read_hub_rows(hub: HubSource, numeric_answers: bool) -> tuple[Example, ...]:
    import datasets  # imported here: only hub-backed splits without a local copy need it

    dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    where = f"hub dataset {hub.path!r}" + (f" ({hub.name})" if hub.name else "") + f" split {hub.split!r}"
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # the field names are task settings that nothing offline can check: name them here
        for field_name in (hub.question_field, hub.answer_field):
            if field_name not in columns:
                raise TaskError(f"{where} has no field {field_name!r}; its fields are {list(columns)} "
                                "(set question_field / answer_field in the task's hub entry)")
    examples = tuple(Example(str(row[hub.question_field]), str(row[hub.answer_field]).strip()) for row in dataset)
    if not examples:
        raise TaskError(f"{where} is empty")
    if numeric_answers:
        for index, example in enumerate(examples):
            try:
                parse_gold_number(example.answer)
            except ValueError as error:
                raise TaskError(f"{where} row {index}: {error} (answer_field {hub.answer_field!r})") from None
    return examples


def _hub_problem(hub: HubSource, error: BaseException) -> str:
    """One line for a hub dataset that could not be loaded, saying how to provide it when the hub is offline."""
    from evomerge.modelio import error_line, hub_offline

    what = f"hub dataset {hub.path!r}" + (f" ({hub.name})" if hub.name else "")
    if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return (f"{what} is not in the datasets cache and the hub is offline (HF_HUB_OFFLINE=1): give a local file, "
                "or load the task once where the hub is reachable")
    return f"{what} could not be loaded: {error_line(error)}"


def _normalise_question(question: str) -> str:
    """What two questions must share to count as the same: NFKC (full-width digits, spaces) and whitespace runs."""
    return " ".join(unicodedata.normalize("NFKC", question).split())


def _resolve_variables(text: str, variables: Mapping[str, str], where: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(1) not in variables:
            raise TaskError(
                f"{where} uses ${{{match.group(1)}}} but variable {match.group(1)!r} is not set; "
                f"pass variables={{{match.group(1)!r}: ...}} to load_task (or {match.group(1)}=... on the command line)"
            )
        return variables[match.group(1)]

    return _VARIABLE.sub(substitute, text)
