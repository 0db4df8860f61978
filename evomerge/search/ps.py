"""Parameter-space search: CMA-ES proposes per-layer-group merge values, each candidate is merged in memory and
scored on the task's search split; the winner, the sources and uniform baselines are then scored on test."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from evomerge.eval.configured import ScoredTask, configured_task, pool_evaluator
from evomerge.eval.evaluator import Evaluator, RowScores
from evomerge.eval.harness import HarnessEvaluator
from evomerge.eval.significance import paired_comparison, row_values
from evomerge.eval.task import check_objectives
from evomerge.errors import MergeError, SearchError
from evomerge.merge.groups import count_blocks, group_names
from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.stream import open_inputs
from evomerge.pathmodel import path_length, unique_parameters
from evomerge.pool import Pool
from evomerge.merge.methods import method
from evomerge.recipe import DFSRecipe, PSRecipe
from evomerge.resources import CONF_DIR
from evomerge.search.genome import PSGenomeSpace
from evomerge.search.optimizer import CMAES
from evomerge.search.racing import Race, RacingSchedule
from evomerge.search.run import Rows

CONF_MERGE = CONF_DIR / "merge"
BASELINES = ("ties", "dare_ties", "task_arithmetic")
RESULT_KINDS = ("best", "dfs", "ps_dfs")  # report rows a search produced, compared with the sources and baselines


@dataclass(frozen=True)
class ReportItem:
    """One row of a held-out report: a pool checkpoint scored as it is (`source`), or a recipe. Items, not
    models, so the rows are evaluated wherever the pool is resident: in this process, or on the Ray workers."""

    name: str
    kind: str  # source, baseline, best; dfs / ps_dfs for a chosen layer path
    source: str | None = None
    recipe: PSRecipe | DFSRecipe | None = None

    @property
    def key(self) -> str:
        return f"source:{self.source}" if self.recipe is None else self.recipe.hash


class PoolProblem:
    """What the PS and DFS problems share: settings, decoding, and the search and test evaluators (built on first
    use). Each kind keeps its own resident models, put in memory by `load` on first use, so a driver whose
    candidates run on Ray workers decodes genomes, tells the optimizer and writes the log without holding them."""

    def __init__(self, cfg: DictConfig, pool: Pool, space: Any, task: ScoredTask):
        self.cfg, self.pool, self.space, self.task = cfg, pool, space, task
        self.objectives = tuple(cfg.search.objectives)

    @functools.cached_property
    def evaluator(self) -> Evaluator | HarnessEvaluator:
        return pool_evaluator(self.task, self.cfg.task, self.pool.tokenizer_source, "search")

    @functools.cached_property
    def test_evaluator(self) -> Evaluator | HarnessEvaluator:
        return pool_evaluator(self.task, self.cfg.task, self.pool.tokenizer_source, "test")

    def decode(self, genome):
        return self.space.decode(genome)


class PSProblem(PoolProblem):
    """Genome -> recipe -> resident merged model -> metrics on the search split."""

    def __init__(self, cfg: DictConfig, pool: Pool, space: PSGenomeSpace, task: ScoredTask):
        super().__init__(cfg, pool, space, task)
        self._merger: InMemoryMerger | None = None

    def load(self) -> None:
        """The pool into memory now (a worker does this as it starts, so its startup covers the load)."""
        if self._merger is None:
            self._merger = InMemoryMerger(self.pool.base, self.pool.models, device=self.cfg.device, dtype=self.cfg.dtype)

    @property
    def merger(self) -> InMemoryMerger:
        self.load()
        return self._merger

    def evaluate(self, recipe: PSRecipe) -> tuple[dict[str, Any], dict[str, float]]:
        started = time.perf_counter()
        model = self.merger.merge(recipe)
        merged = time.perf_counter()
        metrics = self.evaluator.evaluate(model, model_key=recipe.hash).metrics
        return metrics, {"merge": round(merged - started, 4), "eval": round(time.perf_counter() - merged, 4)}

    def evaluate_rows(self, recipe: PSRecipe, rows: Rows) -> tuple[dict[str, RowScores], dict[str, float]]:
        """Each plain task's given rows of the search split, scored (one round of a race)."""
        started = time.perf_counter()
        model = self.merger.merge(recipe)
        merged = time.perf_counter()
        metrics = self.evaluator.evaluate_rows(model, rows)
        return metrics, {"merge": round(merged - started, 4), "eval": round(time.perf_counter() - merged, 4)}

    def report_row(self, item: ReportItem) -> dict[str, Any]:
        """The item on the test split, from the resident pool (a source is written into the resident model, so
        the report never holds a second copy of a model: at 7B on a GPU, not 14.5 GB beside the pool's ~73)."""
        model = self.merger.source(item.source) if item.recipe is None else self.merger.merge(item.recipe)
        return report_row(self.test_evaluator, self.objectives[0], item, model)


def genome_space(cfg: DictConfig, pool: Pool, tensor_names) -> PSGenomeSpace:
    """Layer groups from `search.layer_groups`: 0 = one set of values for the whole model, k = embed, k block
    ranges, head."""
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    spec = method(merge.pop("method"))
    parameters = {k: v for k, v in merge.items() if k not in spec.values}
    k = int(cfg.search.layer_groups)
    try:
        if k < 0:
            raise MergeError("use 0 (one value set) or a number of block ranges")
        groups = group_names(count_blocks(tensor_names), max(k, 1))
    except MergeError as error:
        raise MergeError(f"search.layer_groups={k} does not fit the models: {error}") from None
    return PSGenomeSpace(
        method=spec.name,
        base=pool.base if spec.takes_base else None,
        models=pool.models,
        groups=tuple(groups),
        parameters=parameters,
        shared=k == 0,
        ranges=OmegaConf.to_container(cfg.search.ranges),
    )


def check_settings(cfg: DictConfig, base: str, models: Sequence[str]) -> None:
    """The PS settings that need no model, checked before the pool is touched: search.start, the merge method,
    its parameters and the search ranges (on placeholder layer groups: how many fit is known once the models are)."""
    if cfg.search.start not in ("center", "merge_defaults"):
        raise SearchError(f"search.start={cfg.search.start!r}: use 'merge_defaults' or 'center'")
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    spec = method(merge.pop("method", None))
    PSGenomeSpace(method=spec.name, base=base if spec.takes_base else None, models=tuple(models),
                  groups=("embed", "blocks.0", "head"), parameters={k: v for k, v in merge.items() if k not in spec.values},
                  ranges=OmegaConf.to_container(cfg.search.ranges))


def make_problem(cfg: DictConfig, pool: Pool) -> tuple[PSProblem, Any]:
    """The problem and its optimizer; the checks that need no model first, the pool itself only on first use."""
    task = configured_task(OmegaConf.to_container(cfg.task, resolve=True), pool.variables)
    check_objectives(cfg.search.objectives, task)
    check_settings(cfg, pool.base, pool.models)
    inputs = open_inputs(pool.base, pool.models)  # headers only: the models fit together, and their tensor names
    try:
        space = genome_space(cfg, pool, inputs.names)
    finally:
        inputs.close()
    problem = PSProblem(cfg, pool, space, task)
    x0 = None if cfg.search.start == "center" else space.encode(_method_defaults(cfg))
    optimizer = lambda: CMAES(space.dim, seed=cfg.search.seed, sigma0=cfg.search.sigma0,  # noqa: E731
                              popsize=cfg.search.popsize, x0=x0)
    return problem, optimizer


def make_race(cfg: DictConfig, problem: PSProblem, schedule: RacingSchedule, parents: int) -> Race:
    """The race of `fitness=racing` over this problem's search split, its row order seeded by the search's seed."""
    sizes = {prepared.task.name: len(prepared.prompts) for prepared in problem.evaluator.prepared}
    return Race(schedule, problem.task, cfg.search.objectives, sizes, seed=int(cfg.search.seed), parents=parents)


def _method_defaults(cfg: DictConfig) -> dict[str, float]:
    """The merge config's per-model / per-group values (e.g. weight 1.0, density 0.5), with recipe defaults."""
    merge = OmegaConf.to_container(cfg.merge, resolve=True)
    return {key: merge.get(key, value.default) for key, value in method(merge["method"]).values.items()}


def baseline_recipes(pool: Pool) -> dict[str, PSRecipe]:
    """Uniform merges with each method's default values (evomerge/conf/merge/<method>.yaml): what a hand-tuned merge starts from."""
    return {name: PSRecipe.from_merge_config(yaml.safe_load((CONF_MERGE / f"{name}.yaml").read_text()), pool.base,
                                             list(pool.models))
            for name in BASELINES}


def report_row(evaluator: Evaluator | HarnessEvaluator, objective: str, item: ReportItem, model) -> dict[str, Any]:
    """One model of a held-out report: its metrics (`fitness` = the objective), parameters and path length, and
    its per-row values and outcomes for the paired statistics (`add_paired` takes them out again)."""
    result = evaluator.evaluate(model, model_key=item.key)
    values, outcomes = row_values(evaluator.task, result.samples, objective)
    row = {"name": item.name, "kind": item.kind, "params": unique_parameters(model), "path_length": path_length(model),
           "metrics": {"fitness": result.metrics[objective], **result.metrics}, "per_row": [values, outcomes]}
    if item.recipe is not None:
        row["recipe_hash"] = item.recipe.hash
    return row


def add_paired(report: dict[str, Any]) -> dict[str, Any]:
    """Each searched result (best / dfs / ps_dfs rows) against every source and baseline on the same test rows:
    the difference with its paired bootstrap 95% interval and McNemar's exact p-value, as `report["paired"]`."""
    per_row = {row["name"]: row.pop("per_row") for row in report["rows"]}
    results = [row for row in report["rows"] if row["kind"] in RESULT_KINDS]
    report["paired"] = [{"model": result["name"], "against": other["name"], "kind": other["kind"],
                         **paired_comparison(*per_row[result["name"]], *per_row[other["name"]])}
                        for result in results for other in report["rows"] if other["kind"] not in RESULT_KINDS]
    return report


def report_items(pool: Pool, best: PSRecipe) -> list[ReportItem]:
    """Sources, uniform baselines and the best recipe: the rows of a PS search's held-out report."""
    sources = [ReportItem(name, "source", source=path) for name, path in [("base", pool.base), *zip(pool.names, pool.models)]]
    baselines = [ReportItem(f"{name} (uniform)", "baseline", recipe=recipe) for name, recipe in baseline_recipes(pool).items()]
    return [*sources, *baselines, ReportItem("best (search)", "best", recipe=best)]


def format_rows(report: dict[str, Any]) -> str:
    """One line per row: the fitness, then each component's score (composite tasks) or acc / acc_ja / ja_rate,
    then the parameters and blocks run per token; then the paired statistics of each searched result."""
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
    for model in dict.fromkeys(entry["model"] for entry in report.get("paired", [])):
        entries = [entry for entry in report["paired"] if entry["model"] == model]
        lines.append(f"\n{model} minus each, paired on the same {entries[0]['n']} test rows (bootstrap 95% interval; "
                     "McNemar exact p; rows right only here / only there):")
        lines += [f"  {e['against']:<26}{e['difference']:>+8.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"
                  f"  p={e['mcnemar_p']:<9.3g} {e['better']:>4} / {e['worse']}" for e in entries]
    return "\n".join(lines)
