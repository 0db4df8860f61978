"""Optimizers behind one ask/tell interface (pycma's CMA-ES, pymoo's NSGA-II). Nothing else in evomerge knows which library is underneath.

All of them maximise: `tell` takes fitness values where higher is better (one per objective), and each
optimizer converts to its library's convention. They are deterministic given their seed, and keep their random
state private (the global NumPy state is swapped in only around library calls), so a run's optimizer state can
be rebuilt exactly by replaying its told history -- which is how a checkpoint restores it, with no pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Protocol

import cma
import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2 as _PymooNSGA2
from pymoo.algorithms.moo.nsga2 import binary_tournament
from pymoo.core.mixed import MixedVariableDuplicateElimination, MixedVariableMating
from pymoo.core.population import Population
from pymoo.core.problem import Problem as _PymooProblem
from pymoo.core.termination import NoTermination
from pymoo.core.variable import Binary, Real
from pymoo.operators.selection.rnd import RandomSelection
from pymoo.operators.selection.tournament import TournamentSelection


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
        self.parents = int(self._es.sp.weights.mu)  # mu: how many of a generation's best it recombines

    def ask(self) -> list[np.ndarray]:
        with self._rng.active():
            return [np.asarray(x, dtype=float) for x in self._es.ask()]

    def tell(self, genomes: Sequence[np.ndarray], fitness: Sequence[Sequence[float]]) -> None:
        with self._rng.active():
            self._es.tell(list(genomes), [-float(f[0]) for f in fitness])  # pycma minimises

    def done(self) -> bool:
        return bool(self._es.stop())


GenomeMutation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class _MatingWithGenomeMutation(MixedVariableMating):
    """pymoo's mixed-variable mating (crossover and mutation type by type), then `mutate_child` on each whole
    child: pymoo's per-type operators see one type at a time, so a mutation whose reals depend on the binaries
    (which scales a path uses) runs here, drawing from the algorithm's own random stream."""

    def __init__(self, mutate_child: Callable[[dict, np.random.Generator], dict], **kwargs):
        super().__init__(**kwargs)
        self._mutate_child = mutate_child

    def _do(self, problem, pop, n_offsprings, random_state=None, **kwargs):
        offspring = super()._do(problem, pop, n_offsprings, random_state=random_state, **kwargs)
        for child in offspring:
            child.X = self._mutate_child(child.X, random_state)
        return offspring


class NSGA2:
    """pymoo's NSGA-II over genomes whose first `n_binary` coordinates are 0/1 and the rest unit-box reals,
    with pymoo's mixed-variable operators (uniform crossover and bit flips on the binaries, SBX and polynomial
    mutation on the reals), parents chosen by NSGA-II's binary tournament (constraint, rank, crowding; `tournament`
    False: at random, as pymoo's mixed-variable mating does by default). `mutate`, if given, then changes each
    whole child (e.g. the scales its path uses), drawing from the generator it is handed -- the optimizer's own
    stream. All objectives maximised; `initial` is the first population.

    `violation`, if given, is one inequality constraint known from a genome alone (<= 0 feasible, e.g. how many
    blocks a path is over its length limit). It becomes pymoo's `G`, so NSGA-II's survival applies constraint
    dominance (feasible candidates first, infeasible ones by their violation) -- no penalty on the fitness. It is
    computed at `tell` from the told genomes, so replaying a told history rebuilds the same state."""

    def __init__(self, n_binary: int, n_real: int, n_objectives: int, *, seed: int, popsize: int,
                 initial: Sequence[np.ndarray], violation: Callable[[np.ndarray], float] | None = None,
                 mutate: GenomeMutation | None = None, tournament: bool = True):
        if len(initial) != popsize:
            raise ValueError(f"NSGA-II needs an initial population of {popsize}, got {len(initial)}")
        self.dim = n_binary + n_real
        self._keys = [f"b{i}" for i in range(n_binary)] + [f"r{i}" for i in range(n_real)]
        self._binary = set(self._keys[:n_binary])
        variables = {key: Binary() if key in self._binary else Real(bounds=(0.0, 1.0)) for key in self._keys}
        self._violation = violation
        self._problem = _PymooProblem(vars=variables, n_obj=n_objectives, n_ieq_constr=0 if violation is None else 1)
        self._rng = _PrivateNumpyRandom(seed)
        duplicates = MixedVariableDuplicateElimination()
        selection = TournamentSelection(func_comp=binary_tournament) if tournament else RandomSelection()
        if mutate is None:
            mating = MixedVariableMating(selection=selection, eliminate_duplicates=duplicates)
        else:
            mating = _MatingWithGenomeMutation(lambda x, rng: self._to_pymoo(mutate(self._from_pymoo(x), rng)),
                                               selection=selection, eliminate_duplicates=duplicates)
        self._algorithm = _PymooNSGA2(
            pop_size=popsize,
            sampling=Population.new(X=np.array([self._to_pymoo(g) for g in initial], dtype=object)),
            mating=mating,
            eliminate_duplicates=duplicates,
        )
        with self._rng.active():
            self._algorithm.setup(self._problem, termination=NoTermination(), seed=seed, verbose=False)
        self._asked = None

    def _to_pymoo(self, genome: np.ndarray) -> dict:
        return {key: bool(value >= 0.5) if key in self._binary else float(value) for key, value in zip(self._keys, genome)}

    def _from_pymoo(self, x: dict) -> np.ndarray:
        return np.array([float(x[key]) for key in self._keys])

    def ask(self) -> list[np.ndarray]:
        with self._rng.active():
            self._asked = self._algorithm.ask()
        return [self._from_pymoo(x) for x in self._asked.get("X")]

    def tell(self, genomes: Sequence[np.ndarray], fitness: Sequence[Sequence[float]]) -> None:
        if self._asked is None or len(genomes) != len(self._asked):
            raise ValueError("tell() must follow ask() with one fitness per asked genome")
        self._asked.set("F", -np.asarray(fitness, dtype=float))  # pymoo minimises
        if self._violation is not None:  # pymoo derives each individual's CV (and feasibility) from G
            self._asked.set("G", np.array([[float(self._violation(g))] for g in genomes]))
        with self._rng.active():
            self._algorithm.tell(infills=self._asked)
        self._asked = None

    def done(self) -> bool:
        return False  # the run's budget decides
