"""Optimizers behind one ask/tell interface. Nothing else in evomerge knows which library is underneath.

All of them maximise: `tell` takes fitness values where higher is better (one per objective), and each
optimizer converts to its library's convention. They are deterministic given their seed, and keep their random
state private (the global NumPy state is swapped in only around library calls), so a run's optimizer state can
be rebuilt exactly by replaying its told history -- which is how a checkpoint restores it, with no pickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Protocol

import cma
import numpy as np


class Optimizer(Protocol):
    dim: int

    def ask(self) -> list[np.ndarray]: ...

    def tell(self, genomes: Sequence[np.ndarray], fitness: Sequence[Sequence[float]]) -> None: ...

    def done(self) -> bool: ...


class _PrivateNumpyRandom:
    """Libraries like pycma draw from NumPy's global RNG; give each optimizer its own stream of it."""

    def __init__(self, seed: int):
        saved = np.random.get_state()
        np.random.seed(seed)
        self._state = np.random.get_state()
        np.random.set_state(saved)

    @contextmanager
    def active(self):
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)


class CMAES:
    """pycma's CMA-ES on the unit box, one objective (the first fitness value)."""

    def __init__(self, dim: int, *, seed: int, sigma0: float = 1 / 6, popsize: int | None = None,
                 x0: Sequence[float] | None = None):
        if dim < 1:
            raise ValueError(f"CMA-ES needs at least one dimension, got {dim}")
        self.dim = dim
        self._rng = _PrivateNumpyRandom(seed)
        # Accuracy-style fitness is flat and noisy: stop on the budget, not on pycma's flat-fitness rules.
        options = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9, "tolx": 1e-6, "tolfun": 0,
                   "tolfunhist": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9}
        if popsize:
            options["popsize"] = popsize
        start = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=float)
        with self._rng.active():
            self._es = cma.CMAEvolutionStrategy(start, sigma0, options)
        self.popsize = self._es.popsize

    def ask(self) -> list[np.ndarray]:
        with self._rng.active():
            return [np.asarray(x, dtype=float) for x in self._es.ask()]

    def tell(self, genomes: Sequence[np.ndarray], fitness: Sequence[Sequence[float]]) -> None:
        with self._rng.active():
            self._es.tell(list(genomes), [-float(f[0]) for f in fitness])  # pycma minimises

    def done(self) -> bool:
        return bool(self._es.stop())
