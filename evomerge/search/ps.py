"""Parameter-space search: CMA-ES proposes per-layer-group merge values, each candidate is merged in memory and
scored on the task's search split; the winner, the sources and uniform baselines are then scored on test."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from evomerge.eval.evaluator import Evaluator, pool_evaluator
from evomerge.eval.task import check_objectives, load_task
from evomerge.merge import MergeError
from evomerge.merge.command import recipe_from_merge_config
from evomerge.merge.groups import count_blocks, group_names
from evomerge.merge.memory import InMemoryMerger
from evomerge.modelio import load_model
from evomerge.pathmodel import path_length, unique_parameters
from evomerge.pool import Pool
from evomerge.recipe import GROUP_VALUE_DEFAULTS, METHODS, DFSRecipe, PSRecipe
from evomerge.resources import CONF_DIR
from evomerge.search.genome import PSGenomeSpace
from evomerge.search.optimizer import CMAES
from evomerge.search.run import SearchError

CONF_MERGE = CONF_DIR / "merge"
BASELINES = ("ties", "dare_ties", "task_arithmetic")


class PSProblem:
    """Genome -> recipe -> resident merged model -> metrics on the search split."""

    def __init__(self, space: PSGenomeSpace, merger: InMemoryMerger, evaluator: Evaluator, objectives: tuple[str, ...]):
        self.space = space
        self.merger = merger
        self.evaluator = evaluator
        self.objectives = objectives

    def decode(self, genome) -> PSRecipe:
        return self.space.decode(genome)

    def evaluate(self, recipe: PSRecipe) -> tuple[dict[str, Any], dict[str, float]]:
        started = time.perf_counter()
        model = self.merger.merge(recipe)
        merged = time.perf_counter()
        metrics = self.evaluator.evaluate(model, model_key=recipe.hash).metrics
        return metrics, {"merge": round(merged - started, 4), "eval": round(time.perf_counter() - merged, 4)}


def genome_space(cfg: DictConfig, pool: Pool, tensor_names) -> PSGenomeSpace:
    """Layer groups from `search.layer_groups`: 0 = one set of values for the whole model, k = embed, k block
    ranges, head."""
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    method = merge.pop("method")
    spec = METHODS[method]
    parameters = {k: v for k, v in merge.items() if k not in spec.per_model + spec.per_group}
    k = int(cfg.search.layer_groups)
    try:
        if k < 0:
            raise MergeError("use 0 (one value set) or a number of block ranges")
        groups = group_names(count_blocks(tensor_names), max(k, 1))
    except MergeError as error:
        raise MergeError(f"search.layer_groups={k} does not fit the models: {error}") from None
    return PSGenomeSpace(
        method=method,
        base=pool.base if spec.needs_base else None,
        models=pool.models,
        groups=tuple(groups),
        parameters=parameters,
        shared=k == 0,
        ranges={key: tuple(value) for key, value in OmegaConf.to_container(cfg.search.ranges).items()},
    )


def check_settings(cfg: DictConfig, base: str, models: Sequence[str]) -> None:
    """The PS settings that need no model, checked before the pool is touched: search.start, the merge method,
    its parameters and the search ranges (on placeholder layer groups: how many fit is known once the models are)."""
    if cfg.search.start not in ("center", "merge_defaults"):
        raise SearchError(f"search.start={cfg.search.start!r}: use 'merge_defaults' or 'center'")
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    method = merge.pop("method", None)
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    spec = METHODS[method]
    PSGenomeSpace(method=method, base=base if spec.needs_base else None, models=tuple(models),
                  groups=("embed", "blocks.0", "head"),
                  parameters={k: v for k, v in merge.items() if k not in spec.per_model + spec.per_group},
                  ranges={key: tuple(value) for key, value in OmegaConf.to_container(cfg.search.ranges).items()})


def make_problem(cfg: DictConfig, pool: Pool) -> tuple[PSProblem, Any]:
    # the checks that need no model first, then the pool goes into memory
    task = load_task(cfg.task.name, pool.variables)
    check_objectives(cfg.search.objectives, task)
    check_settings(cfg, pool.base, pool.models)
    merger = InMemoryMerger(pool.base, pool.models, device=cfg.device)
    space = genome_space(cfg, pool, merger.names)
    evaluator = pool_evaluator(task, cfg.task, pool.tokenizer_source, "search")
    problem = PSProblem(space, merger, evaluator, tuple(cfg.search.objectives))
    x0 = None if cfg.search.start == "center" else space.encode(_method_defaults(cfg))
    optimizer = lambda: CMAES(space.dim, seed=cfg.search.seed, sigma0=cfg.search.sigma0,  # noqa: E731
                              popsize=cfg.search.popsize, x0=x0)
    return problem, optimizer


def _method_defaults(cfg: DictConfig) -> dict[str, float]:
    """The merge config's per-model / per-group values (e.g. weight 1.0, density 0.5), with recipe defaults."""
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    spec = METHODS[merge["method"]]
    return {key: merge.get(key, GROUP_VALUE_DEFAULTS[key]) for key in spec.per_model + spec.per_group}


def baseline_recipes(pool: Pool) -> dict[str, PSRecipe]:
    """Uniform merges with each method's default values (evomerge/conf/merge/<method>.yaml): what a hand-tuned merge starts from."""
    recipes = {}
    for method in BASELINES:
        settings = yaml.safe_load((CONF_MERGE / f"{method}.yaml").read_text())
        recipes[method] = recipe_from_merge_config(settings, pool.base, list(pool.models))
    return recipes


def report_row(evaluator: Evaluator, objective: str, name: str, kind: str, model, key: str,
               recipe: PSRecipe | DFSRecipe | None = None) -> dict[str, Any]:
    """One model of a held-out report: its metrics (`fitness` = the objective), parameters and path length."""
    metrics = evaluator.evaluate(model, model_key=key).metrics
    row = {"name": name, "kind": kind, "params": unique_parameters(model), "path_length": path_length(model),
           "metrics": {"fitness": metrics[objective], **metrics}}
    if recipe is not None:
        row["recipe_hash"] = recipe.hash
    return row


def held_out_report(cfg: DictConfig, pool: Pool, merger: InMemoryMerger, best: PSRecipe) -> dict[str, Any]:
    """Sources, uniform baselines and the best recipe on the held-out test split; `fitness` = the objective."""
    task = load_task(cfg.task.name, pool.variables)
    evaluator = pool_evaluator(task, cfg.task, pool.tokenizer_source, "test")
    objective = cfg.search.objectives[0]
    rows = [report_row(evaluator, objective, name, "source", load_model(path, dtype=cfg.dtype, device=cfg.device),
                       f"source:{path}")
            for name, path in [("base", pool.base), *zip(pool.names, pool.models)]]
    for name, recipe in baseline_recipes(pool).items():
        rows.append(report_row(evaluator, objective, f"{name} (uniform)", "baseline", merger.merge(recipe), recipe.hash,
                               recipe))
    rows.append(report_row(evaluator, objective, "best (search)", "best", merger.merge(best), best.hash, best))
    return {"split": "test", "objective": objective, "task": task.name, "rows": rows}


def format_rows(report: dict[str, Any]) -> str:
    """One line per row: the fitness, then each component's score (composite tasks) or acc / acc_ja / ja_rate,
    then the parameters and blocks run per token."""
    metrics = report["rows"][0]["metrics"]
    columns = [k for k in metrics if k.endswith("/score")] or ["acc", "acc_ja", "ja_rate"]
    header = (f"{'model':<26}{'kind':<10}{'fitness':>9}" + "".join(f"{c:>20}" for c in columns)
              + f"{'params':>11}{'path':>6}")
    lines = [f"{report['task']} on the {report['split']} split (fitness = {report['objective']})", header,
             "-" * len(header)]
    for row in report["rows"]:
        m = row["metrics"]
        lines.append(f"{row['name']:<26}{row['kind']:<10}{m['fitness']:>9.3f}" + "".join(f"{m[c]:>20.3f}" for c in columns)
                     + f"{row['params']:>11,}{row['path_length']:>6}")
    return "\n".join(lines)
