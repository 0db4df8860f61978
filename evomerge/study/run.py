"""Run the study: for each base kind, each N, each random expert subset and each method, merge in memory, pick the
method's hyperparameters on the held-in tasks' search split, score on the test split, and normalize.

Normalization follows Yadav et al. (2024): a held-in task's score is divided by its own expert's score, a held-out
task's score by the base's (each base kind by its own base); a task whose reference scores 0 is left out of that
mean and counted in `skipped`. Each merge is one line of `results.jsonl` (its scores and each test question's 0/1
outcome, which the summary's bootstrap resamples), written as it finishes, so a run that is cut short resumes where
it stopped.

Beside the uniform methods, an *evolved* column: per merge, a small CMA-ES search (evomerge's own optimizer and
genome) over per-expert weights of one method, its fitness the held-in tasks' mean score on the search split -- the
same split and criterion the uniform methods' grids are chosen on.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.methods import METHODS
from evomerge.recipe import DEFAULT_GROUPS, PSRecipe
from evomerge.modelio import CheckpointReader, load_model
from evomerge.resources import CONF_DIR
from evomerge.search.genome import PSGenomeSpace
from evomerge.search.optimizer import CMAES
from evomerge.zoo import build
from evomerge.zoo.report import TaskSuite
from evomerge.zoo.study_zoo import (
    base_dir,
    build_study_zoo,
    expert_dir,
    load_study_zoo_spec,
)


EVOLVED = "evolved"  # the evolutionary column's name beside the uniform methods


@dataclass(frozen=True)
class BaseKind:
    """One base and the experts fine-tuned from it, with the reference rows (test split, 0/1 per question in the
    task's primary metric): the base on every task, each expert on its own task and the held-out tasks."""

    name: str
    base: Path
    experts: Mapping[str, Path]  # held-in task -> expert directory
    base_rows: Mapping[str, list[int]]  # task -> rows
    expert_rows: Mapping[str, Mapping[str, list[int]]]  # expert's task -> task -> rows

    @property
    def base_scores(self) -> dict[str, float]:
        return _scores(self.base_rows)

    @property
    def expert_scores(self) -> dict[str, dict[str, float]]:
        return {expert: _scores(rows) for expert, rows in self.expert_rows.items()}


@dataclass(frozen=True)
class StudyPool:
    """One zoo's base kinds and experts: one model size of the study."""

    zoo: Path
    kinds: tuple[BaseKind, ...]
    held_in: tuple[str, ...]
    held_out: tuple[str, ...]
    parameters: int  # of the base: the model size
    gate: Mapping[str, Any] | None = None  # a study zoo's expert gate (threshold, who fails it)


def expert_gate(kinds: Sequence[BaseKind], threshold: float) -> dict[str, Any]:
    """Each held-in expert must score at least `threshold` on its own test task, or "held-in normalized by the
    expert" divides by noise; the experts below it, by name."""
    own = {f"{kind.name}/{task}": scores[task] for kind in kinds for task, scores in kind.expert_scores.items()}
    return {"threshold": threshold, "failed": {name: score for name, score in own.items() if score < threshold}}


def _scores(rows: Mapping[str, Sequence[int]]) -> dict[str, float]:
    return {task: sum(r) / len(r) for task, r in rows.items()}


def _rows(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    return {task: list(s["rows"]) for task, s in scores.items()}


def load_pool(zoo: str, home: str | Path, gate: float = 0.8, label: str | None = None) -> StudyPool:
    """The study pool of `evomerge/conf/zoo/<zoo>.yaml`, building the zoo if needed: a study zoo gives both base kinds and
    all its experts; a default-layout zoo (full, micro) gives one base kind ("plain") and its two experts, with its
    remaining task (toy_ja_math) held out, their reference rows scored here (its report keeps scores only). `gate`:
    what each held-in expert of a study zoo must score on its own test task (the pool names those below it);
    `label` names a second model size: its kinds are `<kind>@<label>` beside the first size's."""
    def named(kind: str) -> str:
        return kind if label is None else f"{kind}@{label}"

    values = yaml.safe_load((CONF_DIR / "zoo" / f"{zoo}.yaml").read_text())
    if "foundation" in values or "extends" in values:
        spec = load_study_zoo_spec(values)
        path = build_study_zoo(spec, home)
        report = json.loads((path / "zoo_report.json").read_text())
        kinds = tuple(
            BaseKind(
                name=named(kind),
                base=base_dir(path, kind),
                experts={task: expert_dir(path, kind, task) for task in spec.held_in},
                base_rows=_rows(entry["base"]),
                expert_rows={task: _rows(scores) for task, scores in entry["experts"].items()},
            )
            for kind, entry in report["kinds"].items()
        )
        return StudyPool(path, kinds, tuple(spec.held_in), tuple(spec.held_out), _parameters(path / "base"),
                         expert_gate(kinds, gate))
    spec = build.ZooSpec.from_dict(values)
    path = build.build_zoo(spec, home)
    held_in = tuple(expert.task for expert in spec.experts.values())
    held_out = tuple(task for task in build.TASKS if task not in held_in)
    suite = TaskSuite(path, [*held_in, *held_out], "test")
    kind = BaseKind(
        name=named("plain"),
        base=path / "base",
        experts={expert.task: path / name for name, expert in spec.experts.items()},
        base_rows=suite.outcomes(load_model(path / "base")),
        expert_rows={expert.task: {t: r for t, r in suite.outcomes(load_model(path / name)).items()
                                   if t == expert.task or t in held_out}
                     for name, expert in spec.experts.items()},
    )
    return StudyPool(path, (kind,), held_in, held_out, _parameters(path / "base"))


def _parameters(model: Path) -> int:
    """From the checkpoint's headers: no weights are read (a 7B base would be 14 GB of them)."""
    with CheckpointReader(model) as reader:
        return sum(math.prod(entry.shape) for entry in reader.entries.values())


def expert_subsets(tasks: Sequence[str], size: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """`count` distinct random subsets of `size` tasks (all of them when there are no more than `count`), the same
    for every base kind and method so their comparisons are paired."""
    tasks = sorted(tasks)
    total = math.comb(len(tasks), size)
    if total <= count:
        return [tuple(c) for c in itertools.combinations(tasks, size)]
    rng = random.Random(f"study/subsets/{seed}/{size}")
    chosen: list[tuple[str, ...]] = []
    while len(chosen) < count:
        subset = tuple(sorted(rng.sample(tasks, size)))
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def method_grid(method: str, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a method's settings; a list value is a grid to choose from on the search split."""
    if method not in METHODS:
        raise ValueError(f"study: unknown merge method {method!r}; known: {sorted(METHODS)}")
    keys = sorted(settings)
    values = [v if isinstance(v, list) else [v] for v in (settings[k] for k in keys)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def make_recipe(method: str, kind: BaseKind, subset: Sequence[str], point: Mapping[str, Any]) -> PSRecipe:
    return PSRecipe.from_merge_config({"method": method, **point}, kind.base, [kind.experts[t] for t in subset])


def normalized(scores: Mapping[str, float], references: Mapping[str, float]) -> tuple[float | None, list[str]]:
    """Mean of score / reference over the tasks whose reference is above 0; and the tasks left out."""
    usable = [t for t in scores if references[t] > 0]
    skipped = [t for t in scores if references[t] <= 0]
    if not usable:
        return None, skipped
    return sum(scores[t] / references[t] for t in usable) / len(usable), skipped


class Scorer:
    """One TaskSuite per (task, split), built once and reused by every merged model."""

    def __init__(self, zoo: Path):
        self.zoo = zoo
        self._suites: dict[tuple[str, str], TaskSuite] = {}

    def __call__(self, model, tasks: Iterable[str], split: str) -> dict[str, list[int]]:
        """Each task's 0/1 rows on `split` (their mean is its score)."""
        rows = {}
        for task in tasks:
            if (task, split) not in self._suites:
                self._suites[(task, split)] = TaskSuite(self.zoo, [task], split)
            rows[task] = self._suites[(task, split)].outcomes(model)[task]
        return rows

    def mean(self, model, tasks: Sequence[str], split: str) -> float:
        """The mean score over `tasks`: what the grids and the evolved column choose by."""
        scores = _scores(self(model, tasks, split))
        return sum(scores.values()) / len(scores)


def _record_key(kind: str, size: int, subset: Sequence[str], method: str) -> str:
    return f"{kind}|{size}|{','.join(subset)}|{method}"


def run_study(pool: StudyPool, settings: Mapping[str, Any], out: Path, log=print) -> list[dict[str, Any]]:
    """Every (kind, N, subset, method) merge, appended to `out/results.jsonl` (kept lines are reused: each names
    its zoo, and a line of this pool's kinds from another zoo -- a rebuilt or changed one -- stops the run)."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    kinds = [k for k in pool.kinds if not settings.get("kinds") or k.name in settings["kinds"]]
    done: dict[str, dict[str, Any]] = {}
    names = {k.name for k in pool.kinds}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["kind"] in names and record.get("zoo") != pool.zoo.name:
                    raise ValueError(f"{results_path}: its {record['kind']} merges come from "
                                     f"{record.get('zoo', 'an unrecorded zoo')}, this study's is {pool.zoo.name}; "
                                     f"start a new run directory")
                done[_record_key(record["kind"], record["n"], record["subset"], record["method"])] = record
    sizes = [n for n in settings["sizes"] if 1 <= n <= len(pool.held_in)]
    columns = {method: method_grid(method, values or {}) for method, values in settings["methods"].items()}
    if settings.get("evolved"):
        columns[EVOLVED] = []
    scorer = Scorer(pool.zoo)
    mergers: dict[str, InMemoryMerger] = {}
    records = []
    # N outermost, base kinds inside: a run cut short still has every kind for the smaller N
    with results_path.open("a") as handle:
        for size in sizes:
            for subset in expert_subsets(pool.held_in, size, settings["subsets"], settings["seed"]):
                for kind in kinds:
                    for method, grid in columns.items():
                        key = _record_key(kind.name, size, subset, method)
                        if key in done:
                            records.append(done[key])
                            continue
                        if settings.get("summarize_only"):
                            continue
                        if kind.name not in mergers:
                            mergers[kind.name] = InMemoryMerger(kind.base, [kind.experts[t] for t in pool.held_in])
                        started = time.perf_counter()
                        choose = _evolve if method == EVOLVED else _choose
                        recipe, chosen, tried = choose(kind, mergers[kind.name], scorer, subset, method, grid, settings)
                        record = _score(pool, kind, mergers[kind.name], scorer, subset, recipe, settings["split"])
                        record = {"kind": kind.name, "zoo": pool.zoo.name, "n": size, "subset": list(subset),
                                  "method": method,
                                  "values": chosen, "grid": tried, **record,
                                  "seconds": round(time.perf_counter() - started, 2)}
                        handle.write(json.dumps(record) + "\n")
                        handle.flush()
                        records.append(record)
                        log(f"{kind.name:>5} N={size} {method:<15} held-in {_fmt(record['held_in_norm'])} "
                            f"held-out {_fmt(record['held_out_norm'])}  {'+'.join(t[4:] for t in subset)} "
                            f"({record['seconds']:.1f} s)")
    return records


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def _choose(kind, merger, scorer, subset, method, grid, settings) -> tuple[PSRecipe, Any, list]:
    """A uniform method's recipe: its grid point with the best held-in mean on the search split (held-out tasks
    are never used)."""
    if len(grid) == 1:
        return make_recipe(method, kind, subset, grid[0]), grid[0], []
    chosen, chosen_score, tried = None, float("-inf"), []
    for point in grid:
        mean = scorer.mean(merger.merge(make_recipe(method, kind, subset, point)), subset, settings["select_split"])
        tried.append({"values": point, "score": round(mean, 4)})
        if mean > chosen_score:
            chosen, chosen_score = point, mean
    return make_recipe(method, kind, subset, chosen), chosen, tried


def _evolve(kind, merger, scorer, subset, method, grid, settings) -> tuple[PSRecipe, Any, list]:
    """The evolved column: CMA-ES over one weight per expert (one value set for the whole model), started from
    every weight at `start`; the best recipe any generation found on the search split."""
    evolved = settings["evolved"]
    space = PSGenomeSpace(method=evolved["method"], base=str(kind.base),
                          models=tuple(str(kind.experts[t]) for t in subset), groups=DEFAULT_GROUPS, shared=True,
                          parameters=dict(evolved.get("parameters") or {}))
    optimizer = CMAES(space.dim, seed=settings["seed"], popsize=evolved["popsize"],
                      x0=space.encode(evolved["start"]))
    best, best_score, tried = None, float("-inf"), []
    for generation in range(evolved["generations"]):
        genomes = optimizer.ask()
        fitness = []
        for genome in genomes:
            recipe = space.decode(genome)
            mean = scorer.mean(merger.merge(recipe), subset, settings["select_split"])
            fitness.append([mean])
            tried.append({"generation": generation, "values": _weights(recipe), "score": round(mean, 4)})
            if mean > best_score:
                best, best_score = recipe, mean
        optimizer.tell(genomes, fitness)
    return best, {**_weights(best), "search_score": round(best_score, 4)}, tried


def _weights(recipe: PSRecipe) -> dict[str, Any]:
    """The evolved values of a one-value-set recipe (every group has the same)."""
    return {key: value for key, value in recipe.to_dict()["groups"][0].items() if key != "name"}


def _score(pool, kind, merger, scorer, subset, recipe: PSRecipe, split: str) -> dict[str, Any]:
    """The recipe's merge on the test split: every held-in task of its subset and every held-out task, normalized."""
    model = merger.merge(recipe)
    rows = scorer(model, [*subset, *pool.held_out], split)
    scores = _scores(rows)
    held_in, held_out = {t: scores[t] for t in subset}, {t: scores[t] for t in pool.held_out}
    held_in_norm, skipped_in = normalized(held_in, {t: kind.expert_scores[t][t] for t in subset})
    held_out_norm, skipped_out = normalized(held_out, kind.base_scores)
    return {
        "split": split, "held_in": held_in, "held_out": held_out,
        "held_in_norm": held_in_norm, "held_out_norm": held_out_norm,
        "skipped": skipped_in + skipped_out, "recipe_hash": recipe.hash, "rows": rows,
    }
