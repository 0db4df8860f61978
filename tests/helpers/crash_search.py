"""A search whose phases take a little time, run as its own process so a test can SIGKILL it mid-merge, mid-eval or
mid-checkpoint-write, and know which phase it hit.

usage: python -m tests.helpers.crash_search RUN_DIR TRACE_FILE GENERATIONS  (or `search(...)` in a forked child)

Each candidate "merges" then "evaluates" (short sleeps around a smooth fitness); a few candidates fail. The real
`run_search` writes the log and checkpoints; this process only slows down its file operations: `os` as seen by
`evomerge.search.run` is wrapped so that every fsync, and every rename of a checkpoint, takes a few milliseconds,
which widens the moments a kill can land inside a checkpoint write (before the temp file is renamed, between
moving the current checkpoint aside and renaming the new one into place). Each phase start is appended to
TRACE_FILE as one line ("merge", "eval", "checkpoint" -- save_checkpoint, traced -- and "idle"), so the killer
can aim at a phase and, after the kill, read which phase was running.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import evomerge.search.run as run_module
from evomerge.search.optimizer import CMAES
from evomerge.search.run import Budget, run_search
from tests.helpers.synthetic_search import VectorRecipe

PHASE_SECONDS = {"merge": 0.02, "eval": 0.03, "fsync": 0.004, "checkpoint": 0.015}
POPSIZE, DIM = 4, 3


class Trace:
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def __call__(self, phase: str) -> None:
        os.write(self.fd, f"{phase}\n".encode())  # one unbuffered append: on disk before the next instruction


class SlowProblem:
    objectives = ("score",)

    def __init__(self, trace: Trace):
        self.trace = trace

    def decode(self, genome) -> VectorRecipe:
        return VectorRecipe(tuple(round(float(v), 6) for v in genome))

    def evaluate(self, recipe: VectorRecipe):
        started = time.perf_counter()
        self.trace("merge")
        time.sleep(PHASE_SECONDS["merge"])
        merged = time.perf_counter()
        self.trace("eval")
        time.sleep(PHASE_SECONDS["eval"])
        x = np.asarray(recipe.values)
        self.trace("idle")
        if x[0] > 0.8:
            raise ValueError("candidate outside the safe region")  # logged, scored worst, the search goes on
        seconds = {"merge": round(merged - started, 4), "eval": round(time.perf_counter() - merged, 4)}
        return {"score": float(1.0 - np.sum((x - 0.3) ** 2)), "split": "search"}, seconds


def slow_os(trace: Trace) -> SimpleNamespace:
    """`os` for evomerge.search.run: the same functions, with fsync and checkpoint renames slowed down."""

    def fsync(fd: int) -> None:
        time.sleep(PHASE_SECONDS["fsync"])
        os.fsync(fd)

    def replace(source, destination) -> None:
        checkpoint = Path(destination).name.startswith("checkpoint")
        if checkpoint:
            time.sleep(PHASE_SECONDS["checkpoint"])
        os.replace(source, destination)
        if checkpoint:
            time.sleep(PHASE_SECONDS["checkpoint"])

    functions = {name: getattr(os, name) for name in dir(os) if not name.startswith("__")}
    return SimpleNamespace(**{**functions, "fsync": fsync, "replace": replace})


def traced(trace: Trace, function):
    """``function`` (run.py's save_checkpoint), marking in the trace when it starts and ends."""

    def wrapper(*args, **kwargs):
        trace("checkpoint")
        function(*args, **kwargs)
        trace("idle")

    return wrapper


def search(run_dir: Path, trace_path: Path, generations: int, slow: bool = True) -> None:
    """Run (or resume) the slowed search (`slow=False`: the same search at full speed, for a reference run).
    Patches `evomerge.search.run` in this process: call it in a child (a subprocess, or a fork as
    tests/test_crash_safety.py does), never in the test process itself."""
    if not slow:
        PHASE_SECONDS.update(dict.fromkeys(PHASE_SECONDS, 0.0))
    trace = Trace(trace_path)
    run_module.os = slow_os(trace)
    run_module.save_checkpoint = traced(trace, run_module.save_checkpoint)
    trace("idle")
    run_search(run_dir, SlowProblem(trace), lambda: CMAES(DIM, seed=5, popsize=POPSIZE, sigma0=0.3),
               {"problem": "crash"}, Budget(generations), progress=False)
    trace("done")


def main() -> None:
    search(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))


if __name__ == "__main__":
    main()
