"""The zoo's report: every model on every toy task (test split), and a small merge probe chosen on the search split."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.eval.evaluator import Evaluator, ResultCache
from evomerge.eval.significance import row_values
from evomerge.eval.task import CompositeTask, load_task
from evomerge.merge.memory import InMemoryMerger
from evomerge.modelio import load_model, load_tokenizer
from evomerge.recipe import PSRecipe

REPORTED_METRICS = ("score", "acc", "acc_ja", "ja_rate")


class TaskSuite:
    """Several tasks on one split. Each plain task is generated once per model; a composite task (e.g.
    toy_two_skill) is combined from its components' results instead of generating them again."""

    def __init__(self, zoo: Path, tasks: Iterable[str], split: str):
        tokenizer = load_tokenizer(zoo / "base")
        variables = {"zoo_dir": str(zoo)}
        self.split = split
        self.tasks = {name: load_task(name, variables) for name in tasks}
        plain = {}
        for task in self.tasks.values():
            for part in [c.task for c in task.components] if isinstance(task, CompositeTask) else [task]:
                plain[part.name] = part
        self.evaluators = {
            name: Evaluator(task, split, tokenizer, batch_size=64, cache=ResultCache(keep_samples=False), progress=False)
            for name, task in plain.items()
        }

    def outcomes(self, model: torch.nn.Module) -> dict[str, list[int]]:
        """Per plain task, each row's 0/1 outcome in its primary metric (their mean is the task's score): what a
        bootstrap over questions resamples. Generated afresh: a cached result keeps no rows."""
        return {name: [int(o) for o in row_values(ev.task, ev.evaluate(model).samples, "score")[1]]
                for name, ev in self.evaluators.items()}

    def scores(self, model: torch.nn.Module, key: str) -> dict[str, dict[str, Any]]:
        plain = {name: ev.evaluate(model, key).metrics for name, ev in self.evaluators.items()}
        return {
            name: _summary(task.combine({c.task.name: plain[c.task.name] for c in task.components}, self.split)
                           if isinstance(task, CompositeTask) else plain[name])
            for name, task in self.tasks.items()
        }


def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"split": metrics["split"], **{k: round(float(metrics[k]), 4) for k in REPORTED_METRICS}}


def zoo_report(zoo: Path, experts: Iterable[str], tasks: Iterable[str], probe_weights, objective: str) -> dict:
    """Score base and experts on the test split; pick the best task-arithmetic probe on search, score it on test."""
    experts, tasks = list(experts), list(tasks)
    test = TaskSuite(zoo, tasks, "test")
    report: dict[str, Any] = {"models": {}}
    for name in ["base", *experts]:
        report["models"][name] = test.scores(load_model(zoo / name), name)
    merger = InMemoryMerger(zoo / "base", [zoo / name for name in experts])
    search = TaskSuite(zoo, [objective], "search")
    tried, best, best_score = [], None, float("-inf")
    for weights in probe_weights:
        recipe = PSRecipe.uniform("task_arithmetic", zoo / "base", merger.models, weight=list(weights))
        score = search.scores(merger.merge(recipe), recipe.hash)[objective]["score"]
        tried.append({"weight": list(weights), "search_score": score})
        if score > best_score:
            best, best_score = recipe, score
    report["merge_probe"] = {
        "recipe": _portable(best.to_dict(), zoo),
        "chosen_on": "search",
        "objective": objective,
        "grid": tried,
        "tasks": test.scores(merger.merge(best), best.hash),
    }
    return report


def _portable(recipe: dict, zoo: Path) -> dict:
    """Model paths relative to the zoo, so the report stays true when the zoo directory is renamed into place."""
    def rel(path: str | None) -> str | None:
        return None if path is None else str(Path(path).relative_to(zoo))
    return {**recipe, "base": rel(recipe["base"]), "models": [rel(m) for m in recipe["models"]]}


GATES = {  # what makes a zoo worth searching: experts that each master one skill, and merges with room to win
    "ja_expert masters toy_ja_qa (acc_ja >= 0.9)": lambda m, p: m["ja_expert"]["toy_ja_qa"]["acc_ja"] >= 0.9,
    "math_expert masters toy_en_math (acc >= 0.9)": lambda m, p: m["math_expert"]["toy_en_math"]["acc"] >= 0.9,
    "ja_expert lacks toy_en_math (acc <= 0.2)": lambda m, p: m["ja_expert"]["toy_en_math"]["acc"] <= 0.2,
    "math_expert lacks toy_ja_qa (acc_ja <= 0.2)": lambda m, p: m["math_expert"]["toy_ja_qa"]["acc_ja"] <= 0.2,
    "merge probe >= better expert + 0.10 on toy_two_skill": lambda m, p: p["tasks"]["toy_two_skill"]["score"]
    >= max(m[name]["toy_two_skill"]["score"] for name in ("ja_expert", "math_expert")) + 0.10,
}


def gate_results(report: Mapping[str, Any]) -> dict[str, bool]:
    """Each gate of the default zoo's recipe, passed or not, on a zoo report."""
    return {name: bool(gate(report["models"], report["merge_probe"])) for name, gate in GATES.items()}


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text table: one row per model (and the merge probe), one column per task's primary score."""
    rows = dict(report["models"])
    rows["merge_probe"] = report["merge_probe"]["tasks"]
    tasks = list(next(iter(rows.values())))
    header = f"{'model (test split)':<20}" + "".join(f"{t:>15}" for t in tasks)
    lines = [header, "-" * len(header)]
    for name, scores in rows.items():
        lines.append(f"{name:<20}" + "".join(f"{scores[t]['score']:>15.3f}" for t in tasks))
    weights = report["merge_probe"]["recipe"]["groups"][0]["weight"]
    lines.append(f"merge_probe = task arithmetic, weights {weights}, chosen on the search split")
    return "\n".join(lines)
