"""Does the DFS scaling matrix evolve? A synthetic recovery benchmark at EvoLLM's size, no model needed.

Two 32-layer models (M = 64 blocks), r = 3: T = 192 include bits and a 64 x 64 scaling matrix W, searched through
the real `DFSGenomeSpace` and the optimizers' ask/tell as `evomerge search search=dfs_nsga2` builds them (the
settings of `evomerge/conf/search/dfs_nsga2.yaml`, one objective). Each seed draws a target path (each slot in with
probability 1/3) and a target scale in [0.5, 1.5] for each transition it takes (block i then block j), and a
candidate scores

    fitness = -(bits differing from the target's) / T - mean over the target's transitions of |scale - target|

where a transition the candidate's path does not take counts as scale 1 (unscaled): like a real model's score, the
fitness reads only the path the genome decodes to, never a scale that path does not use. Compared at one budget
and the same seeds:

    old     NSGA-II as it was: first scales all 1, parents at random, pymoo's per-type operators only
    nsga2   the default now: first scales ~ N(1, 0.1), binary tournament, each child's used scales mutated
    cmaes   search.optimizer=cmaes: pycma over the whole box from embed_from's own path

It prints, per optimizer, the best candidate's bits wrong and W error (mean [min, max] over the seeds) as a
Markdown table to paste. Budget and result: run it to see (the defaults take about 3 minutes of one CPU).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_dfs_recovery.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from evomerge.search.dfs import optimizer_factory
from evomerge.search.genome import DFSGenomeSpace
from evomerge.search.optimizer import NSGA2, Optimizer

CONFIG = Path(__file__).resolve().parents[1] / "evomerge" / "conf" / "search" / "dfs_nsga2.yaml"
SPACE = DFSGenomeSpace(("model_a", "model_b"), (32, 32), repeats=3)
TARGET_INCLUDE_PROBABILITY = 1 / 3
TARGET_SCALES = (0.5, 1.5)


@dataclass(frozen=True)
class Target:
    bits: np.ndarray  # (T,) bool
    transitions: np.ndarray  # genome coordinates of the scales the target path uses
    scales: np.ndarray  # the target scale of each


@dataclass(frozen=True)
class Outcome:
    fitness: float
    bits_wrong: int
    scale_error: float
    cpu_seconds: float


def draw_target(seed: int) -> Target:
    rng = np.random.default_rng(10_000 + seed)
    bits = rng.random(SPACE.slots) < TARGET_INCLUDE_PROBABILITY
    transitions = SPACE.used_scales(np.concatenate([bits.astype(float), np.zeros(SPACE.blocks**2)]))
    return Target(bits, transitions, rng.uniform(*TARGET_SCALES, len(transitions)))


def measure(genome: np.ndarray, target: Target) -> tuple[int, float]:
    """(bits wrong, mean |scale - target| over the target's transitions, an untaken one counting as scale 1), read
    as `DFSGenomeSpace.decode` reads a genome (a slot is in at >= 0.5; the box maps linearly onto scale_range),
    without building the recipe: its checks of 4096 scales would take half the benchmark's time."""
    low, high = SPACE.scale_range
    scales = low + np.clip(genome[target.transitions], 0.0, 1.0) * (high - low)
    taken = np.isin(target.transitions, SPACE.used_scales(genome))
    bits_wrong = int(np.sum((genome[: SPACE.slots] >= 0.5) != target.bits))
    return bits_wrong, float(np.mean(np.abs(np.where(taken, scales, 1.0) - target.scales)))


def fitness(bits_wrong: int, scale_error: float) -> float:
    return -bits_wrong / SPACE.slots - scale_error


def search(make_optimizer: Callable[[], Optimizer], target: Target, generations: int) -> Outcome:
    """The best candidate of `generations` asked and told (its fitness, bits wrong, W error) and the CPU time."""
    started = time.process_time()
    optimizer, best = make_optimizer(), (-np.inf, 0, 0.0)
    for _ in range(generations):
        asked = optimizer.ask()
        scored = [(fitness(*m), *m) for m in (measure(genome, target) for genome in asked)]
        optimizer.tell(asked, [[score[0]] for score in scored])
        best = max([best, *scored], key=lambda score: score[0])
    return Outcome(*best, time.process_time() - started)


def optimizers(popsize: int, seed: int) -> dict[str, tuple[str, Callable[[], Optimizer]]]:
    settings = OmegaConf.merge(OmegaConf.load(CONFIG), {"seed": seed, "popsize": popsize, "objectives": ["score"]})
    old_initial = SPACE.initial_population(popsize, seed, settings.include_probability, scale_spread=0.0)
    return {
        "old": ("NSGA-II as before (scales 1 at start, random mating, no used-scale mutation)",
                lambda: NSGA2(SPACE.slots, SPACE.blocks**2, 1, seed=seed, popsize=popsize, initial=old_initial,
                              tournament=False)),
        "nsga2": ((f"NSGA-II now (scales ~ N(1, {settings.scale_init_spread}), tournament, used scales moved w.p. "
                   f"{settings.scale_mutation_probability} by N(0, {settings.scale_mutation_sigma}))"),
                  optimizer_factory(settings, SPACE)),
        "cmaes": (f"CMA-ES (search.optimizer=cmaes, sigma0 {settings.sigma0:.3g})",
                  optimizer_factory(OmegaConf.merge(settings, {"optimizer": "cmaes"}), SPACE)),
    }


def spread(values: list[float], digits: int, range_digits: int | None = None) -> str:
    """mean [min, max]"""
    low, high, places = min(values), max(values), digits if range_digits is None else range_digits
    return f"{np.mean(values):.{digits}f} [{low:.{places}f}, {high:.{places}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsize", type=int, default=16)
    parser.add_argument("--generations", type=int, default=80)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["old", "nsga2", "cmaes"], help="run these optimizers only")
    args = parser.parse_args()

    seeds = list(range(args.seeds))
    targets = {seed: draw_target(seed) for seed in seeds}
    unscaled = [float(np.mean(np.abs(1.0 - targets[seed].scales))) for seed in seeds]
    rows = []
    for name in args.only or ["old", "nsga2", "cmaes"]:
        outcomes = []
        for seed in seeds:
            label, make_optimizer = optimizers(args.popsize, seed)[name]
            outcomes.append(search(make_optimizer, targets[seed], args.generations))
            print(f"{name} seed {seed}: {outcomes[-1]}", flush=True)
        rows.append(f"| {label} | {spread([o.bits_wrong for o in outcomes], 1, 0)} | "
                    f"{spread([o.scale_error for o in outcomes], 3)} | {spread([o.fitness for o in outcomes], 3)} | "
                    f"{np.mean([o.cpu_seconds for o in outcomes]):.0f} |")

    print(f"\nDFS recovery at EvoLLM's size: M = {SPACE.blocks} blocks, r = {SPACE.repeats}, T = {SPACE.slots} bits, "
          f"W {SPACE.blocks}x{SPACE.blocks}; budget {args.popsize} x {args.generations} = "
          f"{args.popsize * args.generations} evaluations per run; seeds {seeds[0]}-{seeds[-1]}, mean [min, max].")
    print(f"Target paths: {np.mean([t.bits.sum() for t in targets.values()]):.0f} slots on average, scales uniform in "
          f"{list(TARGET_SCALES)}; with every scale 1 the W error is {spread(unscaled, 3)}.\n")
    print(f"| optimizer | bits wrong (of {SPACE.slots}) | W error (mean abs, target's transitions) | fitness | "
          "CPU s per run |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
