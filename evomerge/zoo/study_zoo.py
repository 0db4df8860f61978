"""The study zoo (issue 8): many single-task experts from one base, for "what matters when merging at scale".

Built on the default ("foundation") zoo: its pretrained base is reused as the *plain* base (when the foundation is not
cached, only its data and base are built first -- its experts and report are no part of the study; nothing about the
foundation changes). The study zoo adds

- an *instruction-tuned* base: the plain base after a light generic `Q:`/`A:` reading-comprehension fine-tune;
- one expert per held-in task from each base kind (`experts/<kind>/<task>`), same steps and learning rate for all;
- data for every held-in and held-out task (`data/<task>/{search,test}.jsonl`): the foundation's own rows for its
  tasks (the first `split_sizes` rows of its splits), new rows for the study tasks, none of them in the base's
  pretraining text, the instruction tune or any expert's training pairs;
- `zoo_report.json`: every base and expert on every task (test split).

Stages resume like the default zoo's: `<home>/zoo-study-<hash>.partial/`, renamed into place when the report is
written, and concurrent builds take turns on `<home>/zoo-study-<hash>.lock` the same way (the foundation's lock is
taken first and held until the study zoo is built: no foundation build moves its base away meanwhile). The hash
covers the study spec and the foundation spec.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.eval.task import load_task
from evomerge.modelio import load_model, load_tokenizer
from evomerge.resources import CONF_DIR
from evomerge.zoo import corpus
from evomerge.zoo.build import (
    ZooSpec,
    _eval_splits,
    _save,
    _stage_done,
    build_in_stages,
    zoo_base,
    zoo_dir,
)
from evomerge.zoo.report import TaskSuite
from evomerge.zoo.study_tasks import (
    STUDY_EXAMPLES,
    Pretraining,
    held_out_keys,
    instruction_pairs,
    study_task_splits,
    study_training_examples,
)
from evomerge.zoo.train import finetune, mean_tail

STUDY_SPEC_VERSION = 3  # bump when code changes what a study spec builds
BASE_KINDS = ("plain", "it")


@dataclass(frozen=True)
class StudyZooSpec:
    """Everything a study zoo is built from; its hash (with the foundation's) names the directory."""

    variant: str = "study"
    foundation: dict = field(default_factory=dict)  # a ZooSpec as a dict (evomerge/conf/zoo/full.yaml by default)
    seed: int = 1
    held_in: tuple[str, ...] = (
        "toy_ja_qa", "toy_en_math", "toy_en_qa", "toy_count", "toy_sort", "toy_reverse", "toy_en_ja", "toy_ja_en",
    )
    held_out: tuple[str, ...] = ("toy_equations", "toy_en_story", "toy_ja_story")
    split_sizes: dict[str, int] = field(default_factory=lambda: {"search": 50, "test": 100})
    expert_examples: int = 4000
    expert_steps: int = 400
    expert_steps_for: dict[str, int] = field(default_factory=dict)  # tasks that need more steps than expert_steps
    expert_lr: float = 1e-3
    instruct_examples: int = 4000
    instruct_steps: int = 200
    instruct_lr: float = 3e-4

    @classmethod
    def from_dict(cls, values: dict) -> StudyZooSpec:
        values = dict(values)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown study zoo setting(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        for key in ("held_in", "held_out"):
            if key in values:
                values[key] = tuple(values[key])
        if "foundation" in values:
            values["foundation"] = dict(values["foundation"])
        spec = cls(**values)
        if set(spec.expert_steps_for) - set(spec.held_in):
            raise ValueError(f"study zoo: expert_steps_for names tasks that are not held in: "
                             f"{sorted(set(spec.expert_steps_for) - set(spec.held_in))}")
        unknown_tasks = [t for t in (*spec.held_in, *spec.held_out) if t not in STUDY_EXAMPLES and t not in corpus.EXAMPLES]
        if unknown_tasks:
            raise ValueError(f"study zoo: no generator for task(s) {unknown_tasks}")
        return spec

    @property
    def foundation_spec(self) -> ZooSpec:
        return ZooSpec.from_dict(self.foundation)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["foundation"] = self.foundation_spec.to_dict()
        return {"study_spec_version": STUDY_SPEC_VERSION, "foundation_hash": self.foundation_spec.hash, **values}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def build_study_zoo(spec: StudyZooSpec, home: str | Path) -> Path:
    """Return the study zoo directory for `spec`, building (and first the foundation's base) whatever is missing."""
    final = zoo_dir(spec, home)
    if (final / "zoo_report.json").is_file():
        return final
    stages = {"write_data": _write_data, "copy_base": _copy_base, "instruct_base": _instruct_base,
              "train_experts": _train_experts}
    with zoo_base(spec.foundation_spec, home) as foundation:
        return build_in_stages(
            final,
            {name: functools.partial(stage, spec, foundation) for name, stage in stages.items()},
            lambda work: study_report(work, spec),
            spec.to_dict(),
        )


def expert_dir(zoo: Path, kind: str, task: str) -> Path:
    return zoo / "experts" / kind / task


def base_dir(zoo: Path, kind: str) -> Path:
    return zoo / ("base" if kind == "plain" else f"base_{kind}")


# ---- data: evaluation rows never seen in any training text ----


def _pretraining(foundation: ZooSpec) -> Pretraining:
    """The foundation base's pretraining text, regenerated exactly (same stream)."""
    held_out = {e.question for splits in _eval_splits(foundation).values() for rows in splits.values() for e in rows}
    return Pretraining.of(corpus.pretraining_documents(
        foundation.seed, foundation.pretrain_documents, foundation.pretrain_qa_fraction, held_out
    ))


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluation_rows(spec: StudyZooSpec, foundation: Path | None = None) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> rows. Foundation tasks take the first rows of the foundation zoo's own splits (already kept
    out of its base's pretraining); study tasks are drawn fresh, avoiding the pretraining questions."""
    pretraining = _pretraining(spec.foundation_spec)
    rows: dict[str, dict[str, list[dict]]] = {}
    for task in (*spec.held_in, *spec.held_out):
        if task in STUDY_EXAMPLES:
            splits = study_task_splits(task, spec.seed, spec.split_sizes, pretraining)
            rows[task] = {split: [e.row() for e in examples] for split, examples in splits.items()}
        else:
            assert foundation is not None, f"task {task} comes from the foundation zoo"
            rows[task] = {}
            for split, size in spec.split_sizes.items():
                available = _read_rows(foundation / "data" / task / f"{split}.jsonl")
                if len(available) < size:
                    raise ValueError(f"study zoo: foundation split {task}/{split} has {len(available)} rows, {size} asked")
                rows[task][split] = available[:size]
    return rows


def _held_out_keys(work: Path, spec: StudyZooSpec) -> set[str]:
    keys: set[str] = set()
    for task in (*spec.held_in, *spec.held_out):
        for split in spec.split_sizes:
            for row in _read_rows(work / "data" / task / f"{split}.jsonl"):
                keys |= held_out_keys(task, corpus.Example(row["question"], row["answer"], ""))
    return keys


def _write_data(spec: StudyZooSpec, foundation: Path, work: Path) -> None:
    if (work / "data" / "done").is_file():
        return
    for task, splits in evaluation_rows(spec, foundation).items():
        folder = work / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
    (work / "data" / "done").write_text("")


# ---- models ----


def _copy_base(spec: StudyZooSpec, foundation: Path, work: Path) -> None:
    out = work / "base"
    if _stage_done(out):
        return
    tmp = out.with_name("base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(foundation / "base", tmp)
    tmp.rename(out)


def _instruct_base(spec: StudyZooSpec, foundation: Path, work: Path) -> None:
    out = base_dir(work, "it")
    if _stage_done(out):
        return
    tokenizer = load_tokenizer(work / "base")
    pairs = instruction_pairs(spec.seed, spec.instruct_examples, _held_out_keys(work, spec))
    model = load_model(work / "base")
    losses = finetune(model, tokenizer, pairs, steps=spec.instruct_steps, batch_size=spec.foundation_spec.batch_size,
                      lr=spec.instruct_lr, seed=spec.seed, desc="study zoo: instruction tune")
    _save(model, tokenizer, out, {"final_loss": mean_tail(losses), "task": "generic Q:/A: reading comprehension"})


def _train_experts(spec: StudyZooSpec, foundation: Path, work: Path) -> None:
    exclude = _held_out_keys(work, spec)
    tokenizer = load_tokenizer(work / "base")
    for kind in BASE_KINDS:
        for task_name in spec.held_in:
            out = expert_dir(work, kind, task_name)
            if _stage_done(out):
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            task = load_task(task_name, variables={"zoo_dir": str(work)})
            examples = study_training_examples(task_name, spec.seed, spec.expert_examples, exclude)
            pairs = [(task.build_prompt(e.question), e.completion) for e in examples]
            model = load_model(base_dir(work, kind))
            steps = spec.expert_steps_for.get(task_name, spec.expert_steps)
            losses = finetune(model, tokenizer, pairs, steps=steps, batch_size=spec.foundation_spec.batch_size,
                              lr=spec.expert_lr, seed=spec.seed, desc=f"study zoo: {kind}/{task_name}")
            _save(model, tokenizer, out, {"final_loss": mean_tail(losses), "task": task_name, "base": kind})


def study_report(zoo: Path, spec: StudyZooSpec) -> dict:
    """Test split: each base on every task, each expert on its own task and the held-out tasks (what the study
    normalizes by), each as its score and its 0/1 rows (what the study's bootstrap resamples):
    {"kinds": {kind: {"base": {task: {"score", "rows"}}, "experts": {task: {...}}}}}."""
    suites = {task: TaskSuite(zoo, [task], "test") for task in (*spec.held_in, *spec.held_out)}

    def scores(model, tasks) -> dict:
        rows = {task: suites[task].outcomes(model)[task] for task in tasks}
        return {task: {"score": round(sum(r) / len(r), 4), "rows": r} for task, r in rows.items()}

    report: dict = {"held_in": list(spec.held_in), "held_out": list(spec.held_out), "kinds": {}}
    for kind in BASE_KINDS:
        entry = {"base": scores(load_model(base_dir(zoo, kind)), suites), "experts": {}}
        for task in spec.held_in:
            entry["experts"][task] = scores(load_model(expert_dir(zoo, kind, task)), [task, *spec.held_out])
        report["kinds"][kind] = entry
    return report


def format_study_report(report: dict, gate: dict) -> str:
    """The report as a table, and the `expert_gate` verdict."""
    tasks = [*report["held_in"], *report["held_out"]]
    header = f"{'model (test split)':<22}" + "".join(f"{t[4:]:>10}" for t in tasks)
    lines = [header, "-" * len(header)]
    for kind, entry in report["kinds"].items():
        rows = {f"{kind}/base": entry["base"], **{f"{kind}/{t[4:]}": s for t, s in entry["experts"].items()}}
        for name, scores in rows.items():
            lines.append(f"{name:<22}" + "".join(f"{scores[t]['score']:>10.3f}" if t in scores else f"{'-':>10}"
                                                  for t in tasks))
    lines.append(f"expert gate (own test task >= {gate['threshold']}): " + (
        "passed by every expert" if not gate["failed"] else
        "FAILED by " + ", ".join(f"{name} {score:.2f}" for name, score in gate["failed"].items())))
    return "\n".join(lines)


CONF_ZOO = CONF_DIR / "zoo"


def load_study_zoo_spec(values: dict) -> StudyZooSpec:
    """A study zoo spec from its YAML values; `foundation` may name a default-zoo config (`full` = evomerge/conf/zoo/full.yaml),
    `extends` another study zoo config whose values these replace (a second model size changes only the foundation)."""
    import yaml

    values = dict(values)
    if "extends" in values:
        values = {**yaml.safe_load((CONF_ZOO / f"{values.pop('extends')}.yaml").read_text()), **values}
    if isinstance(values.get("foundation"), str):
        values["foundation"] = yaml.safe_load((CONF_ZOO / f"{values['foundation']}.yaml").read_text())
    return StudyZooSpec.from_dict(values)
