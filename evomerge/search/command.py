"""`evomerge search`: run or resume a search in a run directory, then score the winner on the test split."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.pool import resolve_pool
from evomerge.search import ps
from evomerge.search.executor import make_executor
from evomerge.search.plots import plot_fitness
from evomerge.search.run import Budget, SearchError, load_checkpoint, run_search, write_json_atomic

BUDGET_KEYS = ("generations", "max_seconds", "max_evaluations")  # may change on resume: a search can be extended


def run_directory(cfg: DictConfig) -> Path:
    """`resume=<dir>` continues that run; otherwise the run lives in Hydra's output directory."""
    resume = OmegaConf.select(cfg, "resume")
    if resume:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise SearchError(f"resume={resume}: no such directory")
        if not (path / "checkpoint.json").exists() and not (path / "checkpoint.prev.json").exists():
            raise SearchError(f"resume={resume}: not a search run directory (no checkpoint.json)")
        return path
    return Path(HydraConfig.get().runtime.output_dir)


def search_settings(cfg: DictConfig, pool) -> dict:
    """Everything that must match for a resumed run to be the same search."""
    search = {k: v for k, v in OmegaConf.to_container(cfg.search, resolve=True).items() if k not in BUDGET_KEYS}
    return {
        "pool": {"base": pool.base, "models": list(pool.models)},
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "merge": OmegaConf.to_container(cfg.merge, resolve=True),
        "search": search,
    }


def search_command(cfg: DictConfig) -> dict:
    if cfg.search.kind != "ps":
        raise SearchError(f"search.kind={cfg.search.kind!r} is not supported; use ps")
    run_dir = run_directory(cfg)
    pool = resolve_pool(cfg)
    problem, make_optimizer = ps.make_problem(cfg, pool)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if load_checkpoint(run_dir) is not None:
        print(f"resuming the search in {run_dir}")
    budget = Budget(int(cfg.search.generations), cfg.search.max_seconds, cfg.search.max_evaluations)
    executor = make_executor(cfg, problem, functools.partial(ps.make_problem, cfg, pool))
    try:
        result = run_search(run_dir, problem, make_optimizer, search_settings(cfg, pool), budget,
                            executor=executor, progress=cfg.progress)
    finally:
        executor.close()
    best = problem.decode(np.asarray(result.best["genome"]))
    objective = cfg.search.objectives[0]
    plot_fitness(result.history, run_dir / "fitness.png", objective)
    report = ps.held_out_report(cfg, pool, problem.merger, best)
    report["search"] = {"evaluations": result.evaluations, "generations": len(result.history),
                        "best_search_fitness": result.best["fitness"][0], "best_recipe": "best_recipe.yaml"}
    write_json_atomic(run_dir / "report.json", report)
    print(ps.format_rows(report))
    print(f"run directory: {run_dir}")
    return report
