"""Data-flow-space search (EvoLLM's DFS): NSGA-II (or CMA-ES) over layer paths through the pool models' blocks.

The pool's models (not its base) stay resident; each candidate is a path model over their blocks (no copies),
scored on the task's search split. Objectives are metric names, maximised, "-" minimising: by default the
task score against `path_fraction` (path length / T, the inference cost). `search.max_path_length` is a
constraint of the search (paths within it survive before longer ones) and limits the final choice: after the
search, the Pareto front of everything evaluated is written, and the chosen point -- the best primary objective
among paths no longer than the limit -- is scored on the test split beside the sources.

The scaling matrix evolves: NSGA-II's random first paths draw their scales around 1 (`scale_init_spread`), and
each child moves the scales its own path uses (`scale_mutation_probability`, `scale_mutation_sigma`). A path uses
one of the M x M scales per hop, so pymoo's mutation of the reals (each with probability 1 / M^2, one a child)
almost never reaches one it uses. `search.optimizer=cmaes` is EvoLLM's single-objective variant: pycma on the
whole box, a slot included at >= 0.5.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from transformers import PreTrainedModel

from evomerge.errors import MergeError, SearchError
from evomerge.eval.configured import ScoredTask, configured_task
from evomerge.eval.task import check_objectives
from evomerge.modelio import load_model, read_config
from evomerge.pathmodel import path_length, recipe_path_model
from evomerge.pool import Pool
from evomerge.recipe import DFSRecipe
from evomerge.search.genome import DFSGenomeSpace
from evomerge.search.optimizer import CMAES, NSGA2
from evomerge.search.ps import PoolProblem, ReportItem, report_row

PATH_METRICS = ("path_length", "path_fraction")  # what a candidate's path costs, beside the task's metrics
OPTIMIZERS = ("nsga2", "cmaes")


class DFSProblem(PoolProblem):
    """Genome -> layer path -> path model over the resident sources -> metrics on the search split."""

    def __init__(self, cfg: DictConfig, pool: Pool, space: DFSGenomeSpace, task: ScoredTask):
        super().__init__(cfg, pool, space, task)
        self._sources: list[PreTrainedModel] | None = None

    def load(self) -> None:
        """The sources into memory now (a worker does this as it starts, so its startup covers the load)."""
        if self._sources is None:
            self._sources = [load_model(path, dtype=self.cfg.dtype, device=self.cfg.device) for path in self.pool.models]

    @property
    def sources(self) -> list[PreTrainedModel]:
        self.load()
        return self._sources

    def model(self, recipe: DFSRecipe) -> PreTrainedModel:
        return recipe_path_model(recipe, self.sources)

    def evaluate(self, recipe: DFSRecipe) -> tuple[dict[str, Any], dict[str, float]]:
        started = time.perf_counter()
        model = self.model(recipe)
        built = time.perf_counter()
        metrics = dict(self.evaluator.evaluate(model, model_key=recipe.hash).metrics)
        length = path_length(model)
        metrics.update(path_length=length, path_fraction=round(length / self.space.slots, 6))
        return metrics, {"merge": round(built - started, 4), "eval": round(time.perf_counter() - built, 4)}

    def report_row(self, item: ReportItem) -> dict[str, Any]:
        """A source (resident already) or the chosen path, on the test split."""
        model = self.sources[self.pool.models.index(item.source)] if item.recipe is None else self.model(item.recipe)
        return report_row(self.test_evaluator, self.objectives[0], item, model)


def block_counts(models: Sequence[str]) -> tuple[int, ...]:
    """Each model's number of blocks, from its config (no weights read)."""
    counts = []
    for path in models:
        config = read_config(path)
        layers = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
        if not isinstance(layers, int):
            raise SearchError(f"model {path}: its config.json gives no num_hidden_layers, which a layer-path search "
                              "needs (a decoder's stack of blocks)")
        counts.append(layers)
    return tuple(counts)


def genome_space(cfg: DictConfig, models: Sequence[str]) -> DFSGenomeSpace:
    search = cfg.search
    if not 0 <= search.embed_from < len(models):
        raise SearchError(f"search.embed_from={search.embed_from}: the pool has {len(models)} models (0-based)")
    return DFSGenomeSpace(
        models=tuple(models),
        layers=block_counts(models),
        repeats=int(search.repeats),
        embed_from=int(search.embed_from),
        scale_range=tuple(search.scale_range),
    )


def _check_number(search: DictConfig, key: str, valid: Callable[[float], bool], allowed: str) -> None:
    value = search[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise SearchError(f"search.{key}={value!r}: must be {allowed}")


def check_settings(search: DictConfig, n_models: int) -> None:
    """The DFS settings that need no model (checked before the pool is touched, and again here)."""
    if search.optimizer not in OPTIMIZERS:
        raise SearchError(f"search.optimizer={search.optimizer!r}: use 'nsga2' or 'cmaes'")
    if search.optimizer == "cmaes" and len(search.objectives) != 1:
        raise SearchError(f"search.optimizer=cmaes optimises one objective, search.objectives has "
                          f"{len(search.objectives)} ({', '.join(search.objectives)}): keep one (e.g. "
                          "search.objectives=[score]) or use search.optimizer=nsga2")
    if search.optimizer == "cmaes" and search.max_path_length is not None:
        raise SearchError(f"search.max_path_length={search.max_path_length}: a constraint of NSGA-II's survival, which "
                          "search.optimizer=cmaes has not: set it to null or use search.optimizer=nsga2")
    if search.repeats < 1:
        raise SearchError(f"search.repeats={search.repeats}: a layer path needs at least one repeat of the blocks")
    if search.popsize < 2:
        raise SearchError(f"search.popsize={search.popsize}: the search needs a population of at least 2")
    _check_number(search, "sigma0", lambda v: 0 < v <= 1, "in (0, 1] (CMA-ES's first step in the unit box)")
    _check_number(search, "scale_init_spread", lambda v: v >= 0, ">= 0 (0: the first scales all 1)")
    _check_number(search, "scale_mutation_probability", lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_number(search, "scale_mutation_sigma", lambda v: v >= 0, ">= 0 (a step in scale units)")
    if search.max_path_length is not None and search.max_path_length < 1:
        raise SearchError(f"search.max_path_length={search.max_path_length}: must be at least 1 block (or null)")
    minimised = [name for name in search.objectives if name.startswith("-")]
    if search.objectives[0] in minimised:
        raise SearchError(f"search.objectives[0]={search.objectives[0]!r}: the primary objective is maximised")
    if not 0 <= search.embed_from < n_models:
        raise SearchError(f"search.embed_from={search.embed_from}: the pool has {n_models} models (0-based)")
    low, high = search.scale_range
    if not low <= 1.0 <= high:
        raise MergeError(f"search.scale_range [{low}, {high}] must contain 1 (a block's input unchanged)")


def make_problem(cfg: DictConfig, pool: Pool) -> tuple[DFSProblem, Any]:
    """The problem over the pool's models (in order; the PS+DFS pipeline puts the PS winner first), its sources
    loaded on first use, and its optimizer."""
    search = cfg.search
    check_settings(search, len(pool.models))
    task = configured_task(OmegaConf.to_container(cfg.task, resolve=True), pool.variables)
    check_objectives(search.objectives, task, extra=PATH_METRICS)
    space = genome_space(cfg, pool.models)
    return DFSProblem(cfg, pool, space, task), optimizer_factory(search, space)


def optimizer_factory(search: DictConfig, space: DFSGenomeSpace) -> Callable[[], CMAES | NSGA2]:
    """Builds the optimizer `search.optimizer` names over `space` (afresh for each resume, which replays it)."""
    if search.optimizer == "cmaes":
        return functools.partial(CMAES, space.dim, seed=int(search.seed), sigma0=float(search.sigma0),
                                 popsize=int(search.popsize), x0=cmaes_mean(space))
    initial = space.initial_population(int(search.popsize), int(search.seed), float(search.include_probability),
                                       float(search.scale_init_spread))
    limit = search.max_path_length
    violation = None if limit is None else functools.partial(over_length, space, int(limit))
    mutate = functools.partial(space.perturb_used_scales, probability=float(search.scale_mutation_probability),
                               sigma=float(search.scale_mutation_sigma))
    return functools.partial(NSGA2, space.slots, space.blocks**2, len(search.objectives), seed=int(search.seed),
                             popsize=int(search.popsize), initial=initial, violation=violation, mutate=mutate)


def cmaes_mean(space: DFSGenomeSpace) -> np.ndarray:
    """CMA-ES's first mean: the `embed_from` model's own path, every scale 1, with each slot halfway between the
    0.5 threshold and the box's edge (0.25 / 0.75), so a step of sigma0 = 1/6 flips about one slot in fifteen;
    from 0 / 1 a slot would flip only past three sigma0 and the path would barely move."""
    genome = space.model_path(space.embed_from)
    genome[: space.slots] = 0.25 + 0.5 * genome[: space.slots]
    return genome


def over_length(space: DFSGenomeSpace, max_path_length: int, genome: np.ndarray) -> float:
    """NSGA-II's constraint under `search.max_path_length` (<= 0 feasible): the blocks a genome's path has over
    the limit. The genome alone gives it, so the search steers towards allowed paths at no evaluation's cost."""
    return float(len(space.decode(genome).path) - max_path_length)


def pareto_front(entries: Sequence[dict[str, Any]], max_path_length: int | None = None) -> list[dict[str, Any]]:
    """The non-dominated successful candidates within the length limit (each recipe once), ordered by the primary
    objective: a path over the limit must not push the allowed ones off the front."""
    unique = {}
    for entry in entries:
        within = max_path_length is None or entry["metrics"]["path_length"] <= max_path_length
        if entry["error"] is None and not entry["cached"] and within:
            unique.setdefault(entry["recipe_hash"], entry)
    candidates = list(unique.values())
    if not candidates:
        return []
    fitness = -np.asarray([entry["fitness"] for entry in candidates])  # pymoo's sorting minimises
    front = NonDominatedSorting().do(fitness, only_non_dominated_front=True)
    return sorted((candidates[i] for i in front), key=lambda e: (-e["fitness"][0], e["metrics"]["path_length"]))


def choose(front: Sequence[dict[str, Any]], max_path_length: int | None) -> dict[str, Any]:
    """The best primary objective among paths within the length limit (shorter, then earlier, on ties)."""
    allowed = [e for e in front if max_path_length is None or e["metrics"]["path_length"] <= max_path_length]
    if not allowed:
        shortest = f"; the shortest is {min(e['metrics']['path_length'] for e in front)}" if front else ""
        raise SearchError(f"no successful path is at most search.max_path_length={max_path_length} long{shortest}")
    return min(allowed, key=lambda e: (-e["fitness"][0], e["metrics"]["path_length"], e["index"]))


def front_summary(front: Sequence[dict[str, Any]], objectives: Sequence[str]) -> list[dict[str, Any]]:
    return [{"index": e["index"], "recipe_hash": e["recipe_hash"], "fitness": e["fitness"],
             "objectives": list(objectives), "path_length": e["metrics"]["path_length"],
             "metrics": {k: v for k, v in e["metrics"].items() if isinstance(v, (int, float))}}
            for e in front]


def report_items(pool: Pool, chosen: DFSRecipe, kind: str, name: str) -> list[ReportItem]:
    """The pool's models and the chosen path: the rows of a DFS search's held-out report."""
    return [*(ReportItem(label, "source", source=path) for label, path in zip(pool.names, pool.models)),
            ReportItem(name, kind, recipe=chosen)]
