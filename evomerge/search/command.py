"""`evomerge search`: run or resume a search in a run directory, then score its result on the test split.

`search.kind` picks the search: `ps` (CMA-ES over merge values), `dfs` (NSGA-II or CMA-ES over layer paths), or `ps_dfs`
(EvoLLM's pipeline: the PS search in `<run>/ps`, its winner merged to `<run>/ps/merged` and put first in the
pool, then the DFS search in `<run>/dfs`). Every stage resumes from its own checkpoint.

Checks run cheapest first, so a bad setting fails in seconds with the pool never touched: the search settings,
the device and dtype, the executor, each stage's settings that need no model, the task (its search and test
splits, the objectives as its metrics, the generation settings), then the task's data where it can be read
before the pool (everything but a zoo still to be built) -- and only then is the pool fetched, built or loaded.
`config.yaml` and `report.json` record what was resolved at the start: every generation setting of each task
(task.max_new_tokens null = the task's own), the task variables and the file or hub dataset each split was
read from. With `tracker=wandb` or `tracker=tensorboard` each stage's progress, the recipe it reports and its
held-out report go to that tracker too (`evomerge.search.tracker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import PoolError, TaskError
from evomerge.eval.configured import configured_task
from evomerge.eval.evaluator import generation_options
from evomerge.eval.generate import GenerationSettings
from evomerge.eval.harness import HarnessTask
from evomerge.eval.task import AnyTask, check_objectives, plain_tasks
from evomerge.merge.stream import merge_to_disk
from evomerge.pool import Pool, check_placement, config_variables, early_variables, resolve_pool
from evomerge.recipe import PSRecipe
from evomerge.search import dfs, ps, racing
from evomerge.search.executor import executor_settings, make_executor
from evomerge.search.plots import plot_fitness, plot_pareto
from evomerge.search.run import (
    Budget,
    Executor,
    SearchError,
    SearchResult,
    Tracker,
    load_checkpoint,
    run_search,
    write_json_atomic,
)
from evomerge.search.tracker import open_tracker, tracker_settings

BUDGET_KEYS = ("generations", "max_seconds", "max_evaluations")  # may change on resume: a search can be extended
KINDS = ("ps", "dfs", "ps_dfs")
# Numeric search settings by type: a wrong one (search.popsize=abc) is named here, not deep inside cma or pymoo.
INTEGER_KEYS = ("seed", "popsize", "generations", "layer_groups", "repeats", "embed_from", "max_evaluations",
                "max_path_length")
NUMBER_KEYS = ("sigma0", "max_seconds", "include_probability")
SPLITS = ("search", "test")  # a search scores candidates on the first and reports on the second


def check_numbers(search: dict[str, Any], where: str = "search") -> None:
    """Raise SearchError naming the first integer or number setting that holds something else (None is unset)."""
    for key, value in search.items():
        if isinstance(value, dict):  # a pipeline's stages
            check_numbers(value, f"{where}.{key}")
            continue
        if value is None or key not in INTEGER_KEYS + NUMBER_KEYS:
            continue
        integer = key in INTEGER_KEYS
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise SearchError(f"{where}.{key}={value!r}: expected {'an integer' if integer else 'a number'}")


def _has_checkpoint(path: Path) -> bool:
    return any((path / stage / name).exists() for stage in ("", "ps")
               for name in ("checkpoint.json", "checkpoint.prev.json"))


def run_directory(cfg: DictConfig) -> Path:
    """`resume=<dir>` continues that run; otherwise the run lives in Hydra's output directory."""
    resume = OmegaConf.select(cfg, "resume")
    if resume:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise SearchError(f"resume={resume}: no such directory")
        if not _has_checkpoint(path):
            raise SearchError(f"resume={resume}: not a search run directory (no checkpoint.json)")
        return path
    return Path(HydraConfig.get().runtime.output_dir)


def search_settings(cfg: DictConfig, pool: Pool) -> dict:
    """Everything that must match for a resumed run to be the same search."""
    search = {k: v for k, v in OmegaConf.to_container(cfg.search, resolve=True).items() if k not in BUDGET_KEYS}
    settings = {
        "pool": pool.identity,  # hub models by id and commit, zoo models by spec hash: resumes where the cache moved
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "search": search,
    }
    if cfg.search.kind == "ps":  # a layer-path search merges nothing
        settings["merge"] = OmegaConf.to_container(cfg.merge, resolve=True)
    if config_variables(cfg):  # the task data given (mgsm_search_file=...): a resumed run must read the same
        settings["task_variables"] = config_variables(cfg)
    if racing.fitness_schedule(OmegaConf.to_container(cfg.fitness, resolve=True)) is not None:  # (absent under fitness=full: older runs resume as they were)
        settings["fitness"] = OmegaConf.to_container(cfg.fitness, resolve=True)
    return settings


def search_stages(cfg: DictConfig) -> list[tuple[DictConfig, ModuleType, int]]:
    """Each stage's config, its module and how many models its pool has (PS+DFS: DFS also gets the PS winner)."""
    n_models = len(OmegaConf.select(cfg, "pool.models") or [])
    if cfg.search.kind == "ps":
        return [(cfg, ps, n_models)]
    if cfg.search.kind == "dfs":
        return [(cfg, dfs, n_models)]
    return [(stage_config(cfg, cfg.search.ps), ps, n_models), (stage_config(cfg, cfg.search.dfs), dfs, n_models + 1)]


def generation_record(cfg: DictConfig, task: AnyTask) -> dict[str, dict[str, Any]]:
    """Per plain task, every setting its generations are made with (as the search's evaluators will use them):
    greedy decoding, max_new_tokens (the task's own unless task.max_new_tokens is set), stop strings, batching."""
    options = generation_options(OmegaConf.to_container(cfg.task, resolve=True))
    record = {}
    for plain in plain_tasks(task):
        settings = GenerationSettings(max_new_tokens=options.get("max_new_tokens", plain.max_new_tokens),
                                      stop_strings=plain.stop_strings,
                                      **{key: value for key, value in options.items() if key != "max_new_tokens"})
        record[plain.name] = {"decoding": "greedy", "do_sample": False, "num_beams": 1,
                              **dataclasses.asdict(settings), "stop_strings": list(settings.stop_strings)}
    return record


def check_task(cfg: DictConfig, variables: dict[str, str], read: dict[str, dict[str, str]] | None = None) -> dict:
    """The task for every stage: it has a search and a test split, each stage's objectives are its metrics, its
    generation settings are valid; then each split's data is read where its variables are known (a zoo still to be
    built has not written its data yet), unless `read` already names its source. Returns what a run records."""
    task = configured_task(OmegaConf.to_container(cfg.task, resolve=True), variables)
    for stage_cfg, module, _ in search_stages(cfg):
        check_objectives(stage_cfg.search.objectives, task, extra=dfs.PATH_METRICS if module is dfs else ())
    if isinstance(task, HarnessTask):  # lm-eval reads the data as it loads the tasks; the cut is seeded
        record = task.record()
        return {"generation": {name: entry["generation_kwargs"] for name, entry in record.items()},
                "task_variables": dict(variables), "lm_eval": record,
                "data_sources": {split: {name: entry["data"] for name, entry in record.items()} for split in SPLITS}}
    for plain in plain_tasks(task):
        missing = [split for split in SPLITS if split not in plain.splits]
        if missing:
            raise TaskError(f"task {plain.name!r} has no split {missing[0]!r}, which a search needs (it searches on "
                            f"'search' and reports on 'test'); its splits are {sorted(plain.splits)} ({plain.config_path})")
    record = {"generation": generation_record(cfg, task), "task_variables": dict(variables),
              "data_sources": {split: {} for split in SPLITS}}
    for split in SPLITS:
        for plain in plain_tasks(task):
            source = (read or {}).get(split, {}).get(plain.name)
            if source is None and not plain.missing_variables(split):
                source = plain.load_split(split).source  # reads and checks the rows (and search/test overlap)
            if source is not None:
                record["data_sources"][split][plain.name] = source
    return record


def preflight(cfg: DictConfig) -> dict:
    """Every check that needs no model, before the pool is fetched, built or loaded (see the module's doc)."""
    raced = racing.fitness_schedule(OmegaConf.to_container(cfg.fitness, resolve=True)) is not None
    if raced and cfg.search.kind != "ps":
        raise SearchError(f"fitness=racing races the PS search's candidates (CMA-ES); search.kind={cfg.search.kind} "
                          "needs fitness=full")
    check_placement(cfg.device, cfg.dtype)
    executor_settings(cfg)
    tracker_settings(OmegaConf.to_container(cfg.tracker, resolve=True))
    models = [str(model) for model in OmegaConf.select(cfg, "pool.models") or []]
    if not models:
        raise PoolError("the pool has no models; set pool.models=[...]")
    for stage_cfg, module, n_models in search_stages(cfg):
        if module is ps:
            ps.check_settings(stage_cfg, str(OmegaConf.select(cfg, "pool.base")), models)
        else:
            dfs.check_settings(stage_cfg.search, n_models)
    record = check_task(cfg, early_variables(cfg))
    if raced:
        racing.components(configured_task(OmegaConf.to_container(cfg.task, resolve=True), early_variables(cfg)),
                          cfg.search.objectives[0])
    return record


def write_config(cfg: DictConfig, run_dir: Path, record: dict) -> None:
    """The run's config, and below it what was resolved from it at the start (not settings: for the record)."""
    resolved = OmegaConf.to_yaml(OmegaConf.create({"resolved": record}))
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml(cfg, resolve=True)
        + "# resolved at the start of the run: each task's generation settings, the task variables and where each\n"
        + "# split's rows were read from (a record, not a setting)\n" + resolved, encoding="utf-8")


def stage_config(cfg: DictConfig, search: DictConfig) -> DictConfig:
    """The run's config with `search` replaced by one stage's settings (a pipeline runs several)."""
    return OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True),
                             "search": OmegaConf.to_container(search, resolve=True)})


def sweep_directory() -> str | None:
    """A multirun's sweep directory (its jobs' tracker runs are grouped under it); None for a single run, or a
    stage run from Python."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None


@contextlib.contextmanager
def stage(cfg: DictConfig, pool: Pool, module: ModuleType,
          run_dir: Path) -> Iterator[tuple[Any, Callable[[], Any], Executor, Tracker]]:
    """`module`'s problem, its optimizer factory, the executor its candidates and held-out rows run on (with
    executor=ray the problem here never loads the pool: the workers do) and the tracker of its run directory."""
    problem, make_optimizer = module.make_problem(cfg, pool)
    executor = make_executor(cfg, problem, functools.partial(module.make_problem, cfg, pool))
    with contextlib.closing(executor):
        settings = tracker_settings(OmegaConf.to_container(cfg.tracker, resolve=True))
        config = OmegaConf.to_container(cfg, resolve=True)
        with contextlib.closing(open_tracker(settings, run_dir, config, sweep_directory())) as tracker:
            yield problem, make_optimizer, executor, tracker


def search(cfg: DictConfig, pool: Pool, run_dir: Path, problem: Any, make_optimizer: Callable[[], Any],
           executor: Executor, tracker: Tracker) -> SearchResult:
    """Run (or resume) the stage's search in `run_dir` (raced under fitness=racing), tracked, and plot its
    progress."""
    if load_checkpoint(run_dir) is not None:
        print(f"resuming the search in {run_dir}")
    budget = Budget(int(cfg.search.generations), cfg.search.max_seconds, cfg.search.max_evaluations)
    schedule = racing.fitness_schedule(OmegaConf.to_container(cfg.fitness, resolve=True))
    race = None if schedule is None else ps.make_race(cfg, problem, schedule, make_optimizer().parents)
    result = run_search(run_dir, problem, make_optimizer, search_settings(cfg, pool), budget,
                        executor=executor, race=race, tracker=tracker, progress=cfg.progress)
    plot_fitness(result.history, run_dir / "fitness.png", cfg.search.objectives[0])
    return result


def ps_stage(cfg: DictConfig, pool: Pool, run_dir: Path) -> dict[str, Any]:
    """The PS search, then its winner, the sources and the uniform baselines on test."""
    with stage(cfg, pool, ps, run_dir) as (problem, make_optimizer, executor, tracker):
        result = search(cfg, pool, run_dir, problem, make_optimizer, executor, tracker)
        best = problem.decode(np.asarray(result.best["genome"]))
        rows = executor.report(ps.report_items(pool, best))
        tracker.artifact(run_dir / "best_recipe.yaml")
        tracker.table(rows)
    return {"split": "test", "objective": cfg.search.objectives[0], "task": problem.task.name, "rows": rows,
            "search": {"kind": "ps", "evaluations": result.evaluations, "generations": len(result.history),
                       "best_search_fitness": result.best["fitness"][0], "best_recipe": "best_recipe.yaml"}}


def dfs_stage(cfg: DictConfig, pool: Pool, run_dir: Path, kind: str, name: str) -> dict[str, Any]:
    """The DFS search, its Pareto front (JSON + PNG) and the chosen path beside the pool's models on test."""
    objective = cfg.search.objectives[0]
    with stage(cfg, pool, dfs, run_dir) as (problem, make_optimizer, executor, tracker):
        result = search(cfg, pool, run_dir, problem, make_optimizer, executor, tracker)
        front = dfs.pareto_front(result.entries, cfg.search.max_path_length)
        chosen_entry = dfs.choose(front, cfg.search.max_path_length)
        chosen = problem.decode(np.asarray(chosen_entry["genome"]))
        chosen.save(run_dir / "chosen_recipe.yaml")
        write_json_atomic(run_dir / "pareto.json", dfs.front_summary(front, cfg.search.objectives))
        plot_pareto(result.entries, front, chosen_entry, run_dir / "pareto.png", objective)
        rows = executor.report(dfs.report_items(pool, chosen, kind, name))
        tracker.artifact(run_dir / "chosen_recipe.yaml")
        tracker.table(rows)
    return {
        "split": "test", "objective": objective, "task": problem.task.name, "rows": rows,
        "search": {"kind": kind, "evaluations": result.evaluations, "generations": len(result.history),
                   "best_search_fitness": chosen_entry["fitness"][0], "objectives": list(cfg.search.objectives),
                   "pareto_front": "pareto.json", "pareto_size": len(front), "chosen_recipe": "chosen_recipe.yaml",
                   "max_path_length": cfg.search.max_path_length},
    }


def merged_ps_winner(run_dir: Path) -> Path:
    """`<run>/ps/merged`, holding the PS winner (`ps/best_recipe.yaml`). A resumed PS stage with a larger budget
    may have found another winner: the recipe merge_to_disk wrote beside the weights says which one is merged, and
    a different one is merged anew (staged, then renamed over the old). Not under a DFS stage that has started,
    though: it searched paths over the old merge (at the same path, so its checkpoint and cached candidates could
    not tell), and must not continue over another model -- the run is refused until that stage is moved away."""
    winner = PSRecipe.load(run_dir / "ps" / "best_recipe.yaml")
    merged, dfs_dir = run_dir / "ps" / "merged", run_dir / "dfs"
    if merged.is_dir():  # merge_to_disk stages and renames, so a directory that exists is complete
        was = PSRecipe.load(merged / "evomerge_recipe.yaml").hash
        if was == winner.hash:
            return merged
        if load_checkpoint(dfs_dir) is not None:
            raise SearchError(f"cannot resume: the PS winner changed ({was} -> {winner.hash}) after the DFS stage "
                              f"searched paths over it; move {dfs_dir} away to search paths over the new winner")
    merge_to_disk(winner, merged, overwrite=True)
    return merged


def ps_dfs_pipeline(cfg: DictConfig, pool: Pool, run_dir: Path) -> dict[str, Any]:
    """EvoLLM's route: the PS winner joins the pool as its first model, then DFS searches paths over it."""
    ps_report = ps_stage(stage_config(cfg, cfg.search.ps), pool, run_dir / "ps")
    merged = merged_ps_winner(run_dir)
    dfs_pool = Pool(pool.base, (str(merged), *pool.models), ("ps_winner", *pool.names), pool.variables)
    dfs_report = dfs_stage(stage_config(cfg, cfg.search.dfs), dfs_pool, run_dir / "dfs", "ps_dfs", "PS+DFS (chosen)")
    chosen = [row for row in dfs_report["rows"] if row["kind"] == "ps_dfs"]
    return {**ps_report, "rows": ps_report["rows"] + chosen,
            "search": {"kind": "ps_dfs", "ps": ps_report["search"], "dfs": dfs_report["search"]}}


def search_command(cfg: DictConfig) -> dict:
    if cfg.search.kind not in KINDS:
        raise SearchError(f"search.kind={cfg.search.kind!r} is not supported; use one of {', '.join(KINDS)}")
    check_numbers(OmegaConf.to_container(cfg.search, resolve=True))
    run_dir = run_directory(cfg)
    record = preflight(cfg)  # nothing fetched, built or loaded before this passes
    pool = resolve_pool(cfg)
    record = check_task(cfg, pool.variables, record["data_sources"])  # and the data a zoo wrote as it was built
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir, record)
    if cfg.search.kind == "ps":
        report = ps_stage(cfg, pool, run_dir)
    elif cfg.search.kind == "dfs":
        report = dfs_stage(cfg, pool, run_dir, "dfs", "DFS (chosen)")
    else:
        report = ps_dfs_pipeline(cfg, pool, run_dir)
    ps.add_paired(report)
    report.update(record)  # generation, task_variables, data_sources: what every score in it was made with
    write_json_atomic(run_dir / "report.json", report)
    print(ps.format_rows(report))
    print(f"run directory: {run_dir}")
    return report
