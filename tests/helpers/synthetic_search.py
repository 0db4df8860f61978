"""A search on a cheap synthetic problem, run as its own process so tests can SIGKILL it at chosen moments.

usage: python -m tests.helpers.synthetic_search RUN_DIR GENERATIONS [KILL_AT_EVALUATION|-] [MAX_EVALUATIONS]
The fitness is a smooth function of the genome; `seconds` are fixed so logs compare exactly.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.search.optimizer import CMAES
from evomerge.search.run import Budget, run_search


@dataclass(frozen=True)
class VectorRecipe:
    values: tuple[float, ...]

    @property
    def hash(self) -> str:
        return hashlib.sha256(repr(self.values).encode()).hexdigest()[:12]

    def save(self, path) -> Path:
        Path(path).write_text(f"values: {list(self.values)}\n")
        return Path(path)


SAFE_LIMIT = 0.55  # the first genome value above it fails: 3 of the 30 candidates of 5 generations here


class SyntheticProblem:
    objectives = ("score",)
    safe_limit = SAFE_LIMIT

    def __init__(self, kill_at: int | None):
        self.kill_at = kill_at
        self.calls = 0

    def decode(self, genome) -> VectorRecipe:
        return VectorRecipe(tuple(round(float(v), 6) for v in genome))

    def load(self) -> None:  # nothing to put in memory
        pass

    def report_row(self, recipe: VectorRecipe) -> dict:
        """A held-out row: the candidate's score and the process that computed it."""
        metrics, _ = self.evaluate(recipe)
        return {"values": list(recipe.values), "score": metrics["score"], "pid": os.getpid()}

    def evaluate(self, recipe: VectorRecipe):
        self.calls += 1
        if self.calls - 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = np.asarray(recipe.values)
        if x[0] > self.safe_limit:
            raise ValueError("candidate outside the safe region")  # a failing candidate, logged and scored worst
        return {"score": float(1.0 - np.sum((x - 0.3) ** 2)), "split": "search"}, {"merge": 0.0, "eval": 0.0}


def main() -> None:
    run_dir, generations = Path(sys.argv[1]), int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    max_evaluations = int(sys.argv[4]) if len(sys.argv) > 4 else None
    problem = SyntheticProblem(kill_at)
    run_search(run_dir, problem, lambda: CMAES(4, seed=3, popsize=6), {"problem": "synthetic"},
               Budget(generations, max_evaluations=max_evaluations), progress=False)


if __name__ == "__main__":
    main()
