"""Does the DFS scaling matrix W move, and does it matter? The toy zoo's layer-path search run twice -- W evolving
(the packaged `search=dfs_nsga2`) and W fixed at 1 (`search.scale_range=[1.0,1.0]`) -- with the same seed and
budget, then on the zoo's test split:

- each run's chosen path, its hops and the scales it uses (how far from 1);
- the W-evolving path with every scale set back to 1 (the same blocks, W's own contribution);
- paired differences on the same test rows (bootstrap 95% interval, McNemar's exact p): the evolving path minus
  itself at W = 1, and minus the W-fixed search's path.

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/ablate_dfs_scales.py          # ~20 min on 2 cores
    .venv/bin/python scripts/ablate_dfs_scales.py search.generations=2 search.popsize=8    # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module

from evomerge.cli import main as evomerge
from evomerge.eval.significance import paired_comparison, row_values
from evomerge.pool import resolve_pool
from evomerge.recipe import DFSRecipe
from evomerge.resources import CONF_MODULE
from evomerge.search import dfs

RUNS = {"W evolving": [], "W fixed at 1": ["search.scale_range=[1.0,1.0]"]}


def test_rows(problem: dfs.DFSProblem, recipe: DFSRecipe) -> dict:
    """The recipe's path on the test split: its score and per-row values and outcomes."""
    model = problem.model(recipe)
    result = problem.test_evaluator.evaluate(model, model_key=recipe.hash)
    values, outcomes = row_values(problem.task, result.samples, "score")
    return {"score": result.metrics["score"], "values": values, "outcomes": outcomes}


def describe(recipe: DFSRecipe) -> str:
    """The path as pool model.block hops, each after the first with its input scale, and how far W moved."""
    hops = recipe.path
    scales = [hop.scale for hop in hops[1:]]
    moved = np.abs(np.asarray(scales) - 1.0) if scales else np.zeros(1)
    path = " ".join(f"m{hop.model}.{hop.layer}" + (f"x{hop.scale:.2f}" if index else "") for index, hop in enumerate(hops))
    return f"{len(hops)} blocks: {path}; |scale - 1| mean {moved.mean():.3f}, max {moved.max():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (e.g. search.generations=4)")
    args = parser.parse_args()
    chosen, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="ablate_dfs_") as tmp:
        for name, overrides in RUNS.items():
            run_dir = Path(tmp) / name.replace(" ", "_")
            started = time.perf_counter()
            evomerge(["search", "search=dfs_nsga2", f"hydra.run.dir={run_dir}", "progress=false", *overrides,
                      *args.overrides])
            seconds[name] = time.perf_counter() - started
            chosen[name] = DFSRecipe.load(run_dir / "chosen_recipe.yaml")
            search_fitness = json.loads((run_dir / "report.json").read_text())["search"]["best_search_fitness"]
            print(f"{name}: search + report {seconds[name]:.0f} s, chosen search fitness {search_fitness:.3f}; "
                  f"{describe(chosen[name])}", flush=True)
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "search=dfs_nsga2", "progress=false", *args.overrides])
    problem, _ = dfs.make_problem(cfg, resolve_pool(cfg))
    evolving = chosen["W evolving"]
    unscaled = dataclasses.replace(evolving, scales=tuple((1.0,) * len(row) for row in evolving.scales))
    rows = {"W evolving (chosen)": test_rows(problem, evolving),
            "same path, W = 1": test_rows(problem, unscaled),
            "W fixed at 1 (chosen)": test_rows(problem, chosen["W fixed at 1"])}
    print(f"\n{problem.task.name} on the test split ({len(rows['same path, W = 1']['outcomes'])} rows), score:")
    for name, row in rows.items():
        print(f"  {name:<24}{row['score']:.3f}")
    reference = rows["W evolving (chosen)"]
    figures = {"seconds": seconds, "recipes": {name: r.to_dict() for name, r in chosen.items()},
               "scores": {name: row["score"] for name, row in rows.items()}, "paired": {}}
    for name in ("same path, W = 1", "W fixed at 1 (chosen)"):
        paired = paired_comparison(reference["values"], reference["outcomes"], rows[name]["values"], rows[name]["outcomes"])
        figures["paired"][name] = paired
        print(f"  W evolving minus {name}: {paired['difference']:+.3f} [{paired['ci95'][0]:+.3f}, "
              f"{paired['ci95'][1]:+.3f}], McNemar p={paired['mcnemar_p']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
