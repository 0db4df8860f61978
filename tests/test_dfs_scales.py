"""The DFS scaling matrix evolves: first scales drawn around 1, a mutation aimed at the scales a child's path uses,
NSGA-II's binary tournament, exact replay, and the single-objective CMA-ES option (issue #19, item 2)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import SearchError
from evomerge.search.dfs import check_settings, optimizer_factory
from evomerge.search.genome import DFSGenomeSpace
from evomerge.search.optimizer import CMAES, NSGA2
from evomerge.search.run import Budget, load_checkpoint, run_search

CONFIG = Path(__file__).resolve().parents[1] / "evomerge" / "conf" / "search" / "dfs_nsga2.yaml"
EVOLLM = DFSGenomeSpace(("a", "b"), (32, 32), repeats=3)  # M = 64, T = 192, W 64 x 64


def settings(**changes) -> DictConfig:
    return OmegaConf.merge(OmegaConf.load(CONFIG), changes)


def scales_of(space: DFSGenomeSpace, genome: np.ndarray) -> np.ndarray:
    return np.asarray(space.decode(genome).scales).ravel()


def test_random_first_paths_draw_scales_around_1_within_the_range_and_model_paths_keep_1():
    population = EVOLLM.initial_population(6, seed=0, include_probability=0.33, scale_spread=0.1)
    for genome in population[:2]:  # each model's own path: the working model as it is
        assert (scales_of(EVOLLM, genome) == 1.0).all()
    drawn = np.concatenate([scales_of(EVOLLM, genome) for genome in population[2:]])
    assert (drawn != 1.0).mean() > 0.99 and abs(drawn.mean() - 1.0) < 0.01 and 0.09 < drawn.std() < 0.11
    wide = DFSGenomeSpace(("a", "b"), (2, 2), repeats=2, scale_range=(0.5, 1.5))
    clipped = np.concatenate([scales_of(wide, g) for g in wide.initial_population(40, 1, 0.5, scale_spread=1.0)[2:]])
    assert clipped.min() == 0.5 and clipped.max() == 1.5  # N(1, 1) clipped to the range, never beyond it
    assert all((scales_of(EVOLLM, g) == 1.0).all() for g in EVOLLM.initial_population(6, 0, 0.33, scale_spread=0.0))


def test_used_scales_are_the_transitions_of_the_decoded_path():
    space = DFSGenomeSpace(("a", "b"), (2, 3), repeats=2)  # M = 5
    rng = np.random.default_rng(4)
    for _ in range(20):
        genome = np.concatenate([(rng.random(space.slots) < 0.5).astype(float), rng.random(space.blocks**2)])
        path = space.decode(genome).path
        blocks = [sum(space.layers[:hop.model]) + hop.layer for hop in path]
        expected = {space.slots + i * space.blocks + j for i, j in itertools.pairwise(blocks)}
        assert set(space.used_scales(genome).tolist()) == expected


def test_the_aimed_mutation_moves_only_the_scales_the_path_uses():
    genome = EVOLLM.initial_population(3, seed=2, include_probability=0.33, scale_spread=0.1)[2]
    used = set(EVOLLM.used_scales(genome).tolist())
    everything = EVOLLM.perturb_used_scales(genome, np.random.default_rng(0), probability=1.0, sigma=0.1)
    assert set(np.flatnonzero(everything != genome).tolist()) == used and len(used) > 30
    some = EVOLLM.perturb_used_scales(genome, np.random.default_rng(0), probability=0.3, sigma=0.1)
    moved = set(np.flatnonzero(some != genome).tolist())
    assert moved < used and 0.15 < len(moved) / len(used) < 0.45
    decoded = scales_of(EVOLLM, everything)
    assert 0.0 <= decoded.min() and decoded.max() <= 2.0


def _children(mutate: bool) -> tuple[int, int]:
    """Scales that NSGA-II's children (of parents whose scales are all 1) changed: (on their paths, elsewhere)."""
    search = settings(objectives=["score"], popsize=8, seed=1, scale_init_spread=0.0, scale_mutation_probability=0.5)
    factory = optimizer_factory(search, EVOLLM)
    optimizer = factory() if mutate else factory(mutate=None)
    asked = optimizer.ask()
    optimizer.tell(asked, [[-float(g[: EVOLLM.slots].sum())] for g in asked])
    on_path = elsewhere = 0
    for child in optimizer.ask():
        changed = set(np.flatnonzero(child[EVOLLM.slots:] != EVOLLM.unit_scale()) + EVOLLM.slots)
        used = set(EVOLLM.used_scales(child).tolist())
        on_path, elsewhere = on_path + len(changed & used), elsewhere + len(changed - used)
    return on_path, elsewhere


def test_nsga2_children_move_the_scales_their_paths_use():
    on_path, elsewhere = _children(mutate=True)
    assert on_path > 100 and on_path > 10 * elsewhere  # elsewhere: pymoo's polynomial mutation, ~1 scale a child
    assert _children(mutate=False)[0] < 5  # without it, the scales of the paths stay 1


def _parent_ranks(tournament: bool) -> list[float]:
    """Each chosen parent's place in its population by fitness (0 best, 1 worst), over a few generations."""
    space = DFSGenomeSpace(("a", "b"), (4, 4), repeats=2)
    optimizer = NSGA2(space.slots, space.blocks**2, 1, seed=2, popsize=10, tournament=tournament,
                      initial=space.initial_population(10, seed=2, include_probability=0.5, scale_spread=0.1))
    selection, ranks = optimizer._algorithm.mating.selection, []
    choose = selection._do

    def spy(problem, pop, *args, **kwargs):
        chosen = choose(problem, pop, *args, **kwargs)
        order = np.argsort(np.argsort(pop.get("F")[:, 0], kind="stable"), kind="stable") / (len(pop) - 1)
        ranks.extend(order[chosen.ravel()].tolist())
        return chosen

    selection._do = spy
    for _ in range(6):
        asked = optimizer.ask()
        optimizer.tell(asked, [[float(g[: space.slots].sum())] for g in asked])
    return ranks


def test_parents_are_chosen_by_binary_tournament():
    """The better of two random individuals: a parent from the better half three times in four (random mating: one
    in two)."""
    tournament = np.asarray(_parent_ranks(tournament=True))
    assert len(tournament) >= 50 and (tournament < 0.5).mean() > 0.65
    assert (np.asarray(_parent_ranks(tournament=False)) < 0.5).mean() < 0.6


@pytest.mark.parametrize("optimizer", ["nsga2", "cmaes"])
def test_replaying_a_told_history_asks_the_same_genomes(optimizer):
    """As a resume rebuilds it: a fresh optimizer told the recorded fitness asks the recorded genomes, whatever the
    global NumPy state does in between."""
    space = DFSGenomeSpace(("a", "b"), (4, 4), repeats=3)
    make = optimizer_factory(settings(objectives=["score"], optimizer=optimizer, popsize=6, seed=7), space)
    target = np.random.default_rng(0).random(space.dim)
    first, history = make(), []
    for _ in range(4):
        asked = first.ask()
        np.random.seed(len(history))
        history.append((asked, [[-float(np.abs(g - target).sum())] for g in asked]))
        first.tell(*history[-1])
    replayed = make()
    np.random.rand(100)
    for asked, fitness in history:
        assert all(np.array_equal(a, b) for a, b in zip(replayed.ask(), asked))
        replayed.tell(asked, fitness)
    assert all(np.array_equal(a, b) for a, b in zip(replayed.ask(), first.ask()))


class PathProblem:
    """A DFS problem with no model: the score is how close the decoded path is to a target path and its scales."""

    objectives = ("score",)

    def __init__(self, space: DFSGenomeSpace):
        self.space = space
        self.target = np.random.default_rng(5).random(space.slots) < 0.4

    def decode(self, genome: np.ndarray):
        return self.space.decode(genome)

    def load(self) -> None:
        pass

    def evaluate(self, recipe):
        wrong = np.mean(np.asarray(recipe.include) != self.target)
        off_scale = np.mean([abs(hop.scale - 1.2) for hop in recipe.path])
        return {"score": float(-wrong - off_scale), "split": "search"}, {"merge": 0.0, "eval": 0.0}


def _log(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cmaes_dfs_runs_through_the_search_loop_and_resumes_exactly(tmp_path):
    space = DFSGenomeSpace(("a", "b"), (4, 4), repeats=2)
    search = settings(optimizer="cmaes", objectives=["score"], popsize=6)
    check_settings(search, n_models=2)
    make = optimizer_factory(search, space)
    assert isinstance(make(), CMAES)
    full, split = tmp_path / "full", tmp_path / "split"
    run_search(full, PathProblem(space), make, {"search": "cmaes"}, Budget(4), progress=False)
    run_search(split, PathProblem(space), make, {"search": "cmaes"}, Budget(2), progress=False)
    run_search(split, PathProblem(space), make, {"search": "cmaes"}, Budget(4), progress=False)  # resumed
    assert load_checkpoint(full)["generation"] == 4 and len(_log(full)) == 24 and _log(split) == _log(full)
    assert len({entry["recipe_hash"] for entry in _log(full)}) > 12  # CMA-ES samples paths around its mean


def test_cmaes_with_two_objectives_is_refused_in_one_line():
    with pytest.raises(SearchError, match=r"search.optimizer=cmaes optimises one objective, search.objectives has 2"):
        check_settings(settings(optimizer="cmaes"), n_models=2)
    with pytest.raises(SearchError, match="search.max_path_length=8: a constraint of NSGA-II's survival"):
        check_settings(settings(optimizer="cmaes", objectives=["score"], max_path_length=8), n_models=2)
    with pytest.raises(SearchError, match="search.optimizer='cma': use 'nsga2' or 'cmaes'"):
        check_settings(settings(optimizer="cma"), n_models=2)


@pytest.mark.parametrize("key, value, message", [
    ("scale_init_spread", -0.1, ">= 0"),
    ("scale_mutation_probability", 1.5, "in [0, 1]"),
    ("scale_mutation_sigma", "big", ">= 0"),
    ("sigma0", 0.0, "in (0, 1]"),
])
def test_bad_scale_settings_are_named(key, value, message):
    with pytest.raises(SearchError, match=rf"search.{key}={value!r}: must be {message}".replace("[", r"\[")
                       .replace("(", r"\(").replace(")", r"\)")):
        check_settings(settings(**{key: value}), n_models=2)
