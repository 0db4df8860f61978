"""`evomerge search`: run or resume a search in a run directory, then score its result on the test split.

`search.kind` picks the search: `ps` (CMA-ES over merge values), `dfs` (NSGA-II over layer paths), or `ps_dfs`
(EvoLLM's pipeline: the PS search in `<run>/ps`, its winner merged to `<run>/ps/merged` and put first in the
pool, then the DFS search in `<run>/dfs`). Every stage resumes from its own checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.merge.stream import merge_to_disk
from evomerge.pool import Pool, resolve_pool
from evomerge.recipe import PSRecipe
from evomerge.search import dfs, ps
from evomerge.search.executor import make_executor
from evomerge.search.plots import plot_fitness, plot_pareto
from evomerge.search.run import Budget, SearchError, SearchResult, load_checkpoint, run_search, write_json_atomic

BUDGET_KEYS = ("generations", "max_seconds", "max_evaluations")  # may change on resume: a search can be extended
KINDS = ("ps", "dfs", "ps_dfs")
# Numeric search settings by type: a wrong one (search.popsize=abc) is named here, not deep inside cma or pymoo.
INTEGER_KEYS = ("seed", "popsize", "generations", "layer_groups", "repeats", "embed_from", "max_evaluations",
                "max_path_length")
NUMBER_KEYS = ("sigma0", "max_seconds", "include_probability")


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
        "pool": {"base": pool.base, "models": list(pool.models)},
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "search": search,
    }
    if cfg.search.kind == "ps":  # a layer-path search merges nothing
        settings["merge"] = OmegaConf.to_container(cfg.merge, resolve=True)
    return settings


def stage_config(cfg: DictConfig, search: DictConfig) -> DictConfig:
    """The run's config with `search` replaced by one stage's settings (a pipeline runs several)."""
    return OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True),
                             "search": OmegaConf.to_container(search, resolve=True)})


def run_stage(cfg: DictConfig, pool: Pool, run_dir: Path, module: ModuleType) -> tuple[Any, SearchResult]:
    """Build the problem `module` defines, run (or resume) its search in `run_dir`, plot its progress."""
    problem, make_optimizer = module.make_problem(cfg, pool)
    if load_checkpoint(run_dir) is not None:
        print(f"resuming the search in {run_dir}")
    budget = Budget(int(cfg.search.generations), cfg.search.max_seconds, cfg.search.max_evaluations)
    executor = make_executor(cfg, problem, functools.partial(module.make_problem, cfg, pool))
    try:
        result = run_search(run_dir, problem, make_optimizer, search_settings(cfg, pool), budget,
                            executor=executor, progress=cfg.progress)
    finally:
        executor.close()
    plot_fitness(result.history, run_dir / "fitness.png", cfg.search.objectives[0])
    return problem, result


def ps_stage(cfg: DictConfig, pool: Pool, run_dir: Path) -> dict[str, Any]:
    problem, result = run_stage(cfg, pool, run_dir, ps)
    best = problem.decode(np.asarray(result.best["genome"]))
    report = ps.held_out_report(cfg, pool, problem.merger, best)
    report["search"] = {"kind": "ps", "evaluations": result.evaluations, "generations": len(result.history),
                        "best_search_fitness": result.best["fitness"][0], "best_recipe": "best_recipe.yaml"}
    return report


def dfs_stage(cfg: DictConfig, pool: Pool, run_dir: Path, kind: str, name: str) -> dict[str, Any]:
    """The DFS search, its Pareto front (JSON + PNG) and the chosen path beside the pool's models on test."""
    problem, result = run_stage(cfg, pool, run_dir, dfs)
    objective = cfg.search.objectives[0]
    front = dfs.pareto_front(result.entries)
    chosen_entry = dfs.choose(front, cfg.search.max_path_length)
    chosen = problem.decode(np.asarray(chosen_entry["genome"]))
    chosen.save(run_dir / "chosen_recipe.yaml")
    write_json_atomic(run_dir / "pareto.json", dfs.front_summary(front, cfg.search.objectives))
    plot_pareto(result.entries, front, chosen_entry, run_dir / "pareto.png", objective)
    return {
        "split": "test", "objective": objective, "task": cfg.task.name,
        "rows": dfs.held_out_rows(cfg, pool, problem, chosen, kind, name),
        "search": {"kind": kind, "evaluations": result.evaluations, "generations": len(result.history),
                   "best_search_fitness": chosen_entry["fitness"][0], "objectives": list(cfg.search.objectives),
                   "pareto_front": "pareto.json", "pareto_size": len(front), "chosen_recipe": "chosen_recipe.yaml",
                   "max_path_length": cfg.search.max_path_length},
    }


def ps_dfs_pipeline(cfg: DictConfig, pool: Pool, run_dir: Path) -> dict[str, Any]:
    """EvoLLM's route: the PS winner joins the pool as its first model, then DFS searches paths over it."""
    ps_report = ps_stage(stage_config(cfg, cfg.search.ps), pool, run_dir / "ps")
    merged = run_dir / "ps" / "merged"
    if not merged.is_dir():  # merge_to_disk stages and renames, so a directory that exists is complete
        merge_to_disk(PSRecipe.load(run_dir / "ps" / "best_recipe.yaml"), merged)
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
    pool = resolve_pool(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.search.kind == "ps":
        report = ps_stage(cfg, pool, run_dir)
    elif cfg.search.kind == "dfs":
        report = dfs_stage(cfg, pool, run_dir, "dfs", "DFS (chosen)")
    else:
        report = ps_dfs_pipeline(cfg, pool, run_dir)
    write_json_atomic(run_dir / "report.json", report)
    print(ps.format_rows(report))
    print(f"run directory: {run_dir}")
    return report
