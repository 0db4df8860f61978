"""Do layer paths have room on the DFS zoo (`zoo=dfs`, evomerge/conf/zoo/dfs.yaml: 12 thin blocks, the Japanese
expert fine-tuned in blocks 6-11 only, the math expert in blocks 0-5 only)? Two searches with the packaged
settings -- DFS (`search=dfs_nsga2`) and PS+DFS (`search=ps_dfs`, whose PS stage is the packaged PS search) --
then, on the zoo's test split, with paired differences on the same rows (bootstrap 95% interval, McNemar's
exact p):

- each source's own path (the experts as they are);
- the composition the zoo was built for: each expert's fine-tuned blocks in depth order (the math expert's 0-5, then
  the Japanese expert's 6-11), every scale 1 -- a path the DFS search can reach (with disjoint block ranges it is
  also task arithmetic at weights 1, 1);
- DFS's chosen path, the PS winner, PS+DFS's chosen path.

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/dfs_zoo.py --out /tmp/dfs_zoo   # ~32 min on 2 cores, + the zoo build
    .venv/bin/python scripts/dfs_zoo.py --out /tmp/quick search.generations=2                  # a quick look

A search whose run directory under --out already has its report is not run again.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from evomerge.cli import main as evomerge
from evomerge.eval.significance import paired_comparison, row_values
from evomerge.modelio import load_model
from evomerge.pool import Pool, resolve_pool
from evomerge.recipe import DFSRecipe
from evomerge.resources import CONF_MODULE
from evomerge.search import dfs

SEARCHES = {"dfs": "dfs_nsga2", "ps_dfs": "ps_dfs"}
COMPARED = [  # (first, other): first minus other on the same test rows
    ("composition", "ja_expert"), ("composition", "math_expert"),
    ("DFS", "ja_expert"), ("DFS", "math_expert"), ("DFS", "composition"), ("DFS", "PS"), ("PS+DFS", "PS"),
]


def composition(pool: Pool, zoo: Mapping[str, Any], repeats: int) -> DFSRecipe:
    """Block by block in depth order, the expert fine-tuned there (`layers` in the zoo spec), every scale 1; each
    hop in the first slot after the previous hop's (so a path that goes back to a lower slot uses the next repeat)."""
    layers = int(zoo["num_layers"])
    owner = {layer: index for index, name in enumerate(pool.names) for layer in range(*zoo["experts"][name]["layers"])}
    blocks = layers * len(pool.models)
    include, slot = [False] * blocks * repeats, -1
    for layer in range(layers):
        block = owner[layer] * layers + layer
        slot = block + blocks * ((slot - block) // blocks + 1)  # the first slot of this block after `slot`
        include[slot] = True
    return DFSRecipe(tuple(pool.models), (layers,) * len(pool.models), repeats, tuple(include),
                     ((1.0,) * blocks,) * blocks)


def describe(recipe: DFSRecipe, names: list[str]) -> str:
    hops = recipe.path
    return f"{len(hops)} blocks: " + " ".join(
        f"{names[hop.model]}.{hop.layer}" + (f"x{hop.scale:.2f}" if index else "") for index, hop in enumerate(hops))


def scored(problem: dfs.DFSProblem, model: Any, key: str) -> dict[str, Any]:
    """A model on the test split: its metrics and per-row values and outcomes."""
    result = problem.test_evaluator.evaluate(model, model_key=key)
    values, outcomes = row_values(problem.task, result.samples, "score")
    return {"metrics": dict(result.metrics), "values": values, "outcomes": outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directories and dfs_zoo.json go here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both searches (e.g. search.generations=2)")
    args = parser.parse_args()
    seconds = {}
    for name, search in SEARCHES.items():
        run_dir = args.out / name
        if not (run_dir / "report.json").is_file():
            started = time.perf_counter()
            evomerge(["search", "zoo=dfs", f"search={search}", f"hydra.run.dir={run_dir}", "progress=false",
                      *args.overrides])
            seconds[name] = round(time.perf_counter() - started)
            print(f"{name}: search + report {seconds[name]} s", flush=True)
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "zoo=dfs", "search=dfs_nsga2", "progress=false"])
    pool = resolve_pool(cfg)
    problem, _ = dfs.make_problem(cfg, pool)
    merged = args.out / "ps_dfs" / "ps" / "merged"
    ps_dfs_pool = Pool(pool.base, (str(merged), *pool.models), ("ps_winner", *pool.names), pool.variables)
    ps_dfs_problem, _ = dfs.make_problem(cfg, ps_dfs_pool)
    zoo = OmegaConf.to_container(cfg.zoo, resolve=True)
    recipes = {"composition": composition(pool, zoo, int(cfg.search.repeats)),
               "DFS": DFSRecipe.load(args.out / "dfs" / "chosen_recipe.yaml")}
    ps_dfs_recipe = DFSRecipe.load(args.out / "ps_dfs" / "dfs" / "chosen_recipe.yaml")
    rows = {name: scored(problem, load_model(path), name) for name, path in zip(pool.names, pool.models)}
    rows.update({name: scored(problem, problem.model(recipe), recipe.hash) for name, recipe in recipes.items()})
    rows["PS"] = scored(problem, load_model(merged), "ps_winner")
    rows["PS+DFS"] = scored(ps_dfs_problem, ps_dfs_problem.model(ps_dfs_recipe), ps_dfs_recipe.hash)
    paths = {name: describe(recipe, list(pool.names)) for name, recipe in recipes.items()}
    paths["PS+DFS"] = describe(ps_dfs_recipe, list(ps_dfs_pool.names))
    components = [k for k in rows["DFS"]["metrics"] if k.endswith("/score")]
    print(f"\n{problem.task.name} on the test split ({len(rows['DFS']['outcomes'])} rows):")
    print(f"  {'model':<14}{'score':>8}" + "".join(f"{k:>22}" for k in components))
    for name, row in rows.items():
        metrics = row["metrics"]
        print(f"  {name:<14}{metrics['score']:>8.3f}" + "".join(f"{metrics[k]:>22.3f}" for k in components))
    for name, path in paths.items():
        print(f"  {name}: {path}")
    figures: dict[str, Any] = {"seconds": seconds, "paths": paths, "paired": {},
                               "scores": {name: {k: row["metrics"][k] for k in ["score", *components]}
                                          for name, row in rows.items()}}
    for first, other in COMPARED:
        a, b = rows[first], rows[other]
        paired = paired_comparison(a["values"], a["outcomes"], b["values"], b["outcomes"])
        figures["paired"][f"{first} - {other}"] = paired
        print(f"  {first} minus {other}: {paired['difference']:+.3f} [{paired['ci95'][0]:+.3f}, "
              f"{paired['ci95'][1]:+.3f}], McNemar p={paired['mcnemar_p']:.3g}")
    (args.out / "dfs_zoo.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
