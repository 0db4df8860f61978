"""The default PS search on the micro zoo -- the real in-memory merger and the real evaluator -- run in a forked
child so a test can SIGKILL it mid-merge, mid-eval or mid-checkpoint-write, and know which phase it hit.

`search(...)` (called in a forked child) composes the search config for `zoo=micro`, builds the real problem
(`evomerge.search.ps.make_problem`) and traces its phases: each start is appended to TRACE_FILE as one line
("merge" before `InMemoryMerger.merge`, "eval" before `Evaluator.evaluate`, "checkpoint" around run.py's
save_checkpoint, "idle" after each), so the killer can aim at a phase and, after the kill, read which phase was
running. `os` as seen by `evomerge.search.run` is wrapped so that every fsync and every rename of a checkpoint
takes a few milliseconds, and so does every merge, which widens the moments a kill can land inside a checkpoint
write or a merge (an in-memory merge of the micro zoo is sub-millisecond: kills aimed at it landed in the
evaluation). A few candidates fail on purpose after their real merge and evaluation (the first genome value above
SAFE_LIMIT), so failed candidates are replayed on resume too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import evomerge.search.run as run_module
from evomerge.pool import resolve_pool
from evomerge.resources import CONF_MODULE
from evomerge.search.ps import make_problem, make_race
from evomerge.search.racing import fitness_schedule
from evomerge.search.run import Budget, run_search

CHECKPOINT_SECONDS = {"fsync": 0.004, "rename": 0.015}
MERGE_SECONDS = 0.02  # added to each merge of a slowed life: an in-memory merge of the micro zoo takes ~0.1 ms
POPSIZE = 4
SAFE_LIMIT = 1.3  # candidates whose first weight is above it fail after merging and evaluating (~1 in 9)


class Trace:
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def __call__(self, phase: str) -> None:
        os.write(self.fd, f"{phase}\n".encode())  # one unbuffered append: on disk before the next instruction


def traced(trace: Trace, phase: str, function):
    """`function`, marking in the trace when it starts and ends."""

    def wrapper(*args, **kwargs):
        trace(phase)
        result = function(*args, **kwargs)
        trace("idle")
        return result

    return wrapper


def slowed(function, seconds: float):
    """`function`, taking `seconds` longer: a phase too short for a kill to land in reliably gets room."""

    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return wrapper


def slow_os() -> SimpleNamespace:
    """`os` for evomerge.search.run: the same functions, with fsync and checkpoint renames slowed down."""

    def fsync(fd: int) -> None:
        time.sleep(CHECKPOINT_SECONDS["fsync"])
        os.fsync(fd)

    def replace(source, destination) -> None:
        checkpoint = Path(destination).name.startswith("checkpoint")
        if checkpoint:
            time.sleep(CHECKPOINT_SECONDS["rename"])
        os.replace(source, destination)
        if checkpoint:
            time.sleep(CHECKPOINT_SECONDS["rename"])

    functions = {name: getattr(os, name) for name in dir(os) if not name.startswith("__")}
    return SimpleNamespace(**{**functions, "fsync": fsync, "replace": replace})


class FailOutsideSafeRegion:
    """The real problem, except that candidates outside the safe region fail after their real merge and evaluation."""

    def __init__(self, problem):
        self.problem = problem
        self.objectives = problem.objectives

    def decode(self, genome):
        return self.problem.decode(genome)

    def evaluate(self, recipe):
        return self._checked(recipe, self.problem.evaluate(recipe))

    def evaluate_rows(self, recipe, rows):
        return self._checked(recipe, self.problem.evaluate_rows(recipe, rows))

    @staticmethod
    def _checked(recipe, result):
        if first_weight(recipe) > SAFE_LIMIT:
            raise ValueError("candidate outside the safe region")  # logged, scored worst, the search goes on
        return result


def first_weight(recipe) -> float:
    return float(recipe.to_dict()["groups"][0]["weight"][0])


# fitness=racing on the micro zoo's 8-row splits: rounds of 2, 4 and 8 rows per task
RACING = ["fitness=racing", "fitness.first_rows=2"]


def search(run_dir: Path, trace_path: Path, generations: int, home: Path, slow: bool = True,
           racing: bool = False) -> None:
    """Run (or resume) the traced search (`slow=False`: no slowed checkpoint writes, for a reference run; `racing`:
    under fitness=racing). Patches `evomerge.search.run` in this process: call it in a forked child, never in the
    test process."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "zoo=micro", f"home={home}", "progress=false",
                                           f"search.popsize={POPSIZE}", *(RACING if racing else [])])
    problem, make_optimizer = make_problem(cfg, resolve_pool(cfg))
    schedule = fitness_schedule(OmegaConf.to_container(cfg.fitness))
    race = make_race(cfg, problem, schedule, make_optimizer().parents) if schedule is not None else None
    trace = Trace(trace_path)
    merge = slowed(problem.merger.merge, MERGE_SECONDS) if slow else problem.merger.merge
    problem.merger.merge = traced(trace, "merge", merge)
    problem.evaluator.evaluate = traced(trace, "eval", problem.evaluator.evaluate)
    problem.evaluator.evaluate_rows = traced(trace, "eval", problem.evaluator.evaluate_rows)
    run_module.save_checkpoint = traced(trace, "checkpoint", run_module.save_checkpoint)
    if slow:
        run_module.os = slow_os()
    trace("idle")
    run_search(run_dir, FailOutsideSafeRegion(problem), make_optimizer, {"problem": "crash"}, Budget(generations),
               race=race, progress=False)
    trace("done")
