"""Benchmark the fitness schedules: `fitness=full` against `fitness=racing` at the same candidate budget, on the toy
zoo with a search split large enough for subsets to matter.

The zoo's own generators make `--rows` new search questions per task (default 500), disjoint from the zoo's search
and test splits, from the experts' fine-tuning pairs and from every pretraining document; they are written into a
view of the zoo (its models linked, its test split kept) so every schedule searches the same rows and reports on the
zoo's test split. Each seed runs each schedule once (full; racing on random rows; racing on informative rows), with
the default PS search (CMA-ES over task-arithmetic weights, popsize 10), and the best recipe of each run is scored on
test.

Printed per schedule, summed or averaged over the seeds, and as ratios against `full` measured in this same run:
answers generated (rows scored, every round of every candidate), tokens generated, search wall time, the best's
search fitness; and per seed the best's test score with its Wilson 95% interval, and each racing best minus the
full best on the same test rows (paired bootstrap 95% interval, McNemar's exact p).

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/bench_fitness.py              # 3 seeds, ~45 min
    .venv/bin/python scripts/bench_fitness.py --seeds 0 --generations 2 --rows 100         # a quick look
    .venv/bin/python scripts/bench_fitness.py --racing indifference=0.1 --racing indifference=0  # other races
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy import stats

from evomerge.eval.significance import paired_comparison, row_values
from evomerge.pool import Pool, resolve_pool
from evomerge.resources import CONF_MODULE
from evomerge.search import ps
from evomerge.search.racing import fitness_schedule
from evomerge.search.run import Budget, SerialExecutor, load_checkpoint, run_search
from evomerge.zoo import corpus
from evomerge.zoo.build import ZooSpec

SEARCHED_TASKS = ("toy_ja_qa", "toy_en_math")  # toy_two_skill's components


def load_config(overrides: list[str]):
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["command=search", "progress=false", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def fresh_rows(spec: ZooSpec, task: str, count: int) -> list[corpus.Example]:
    """`count` questions from the zoo's generator that no split, fine-tuning pair or pretraining text holds."""
    drawn = corpus.task_splits(task, spec.seed, {**spec.split_sizes, "bench": 4 * count})["bench"]
    held_out = {e.question for t in corpus.EXAMPLES for rows in corpus.task_splits(t, spec.seed, spec.split_sizes).values()
                for e in rows}
    trained = {e.question for expert in spec.experts.values()
               for e in corpus.training_examples(expert.task, spec.seed, spec.expert_examples, held_out)}
    pretraining = "\n".join(corpus.pretraining_documents(spec.seed, spec.pretrain_documents, spec.pretrain_qa_fraction,
                                                         held_out))
    rows = [e for e in drawn if e.question not in trained and e.question not in pretraining][:count]
    if len(rows) < count:
        raise SystemExit(f"{task}: only {len(rows)} fresh questions of {4 * count} drawn; ask for fewer --rows")
    return rows


def zoo_view(cfg, pool: Pool, rows: int, root: Path) -> Pool:
    """The zoo's models (linked) with a search split of `rows` fresh questions per task and the zoo's test split."""
    zoo = Path(pool.variables["zoo_dir"])
    spec = ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True))
    for task in SEARCHED_TASKS:
        folder = root / "data" / task
        folder.mkdir(parents=True)
        lines = "".join(json.dumps(e.row(), ensure_ascii=False) + "\n" for e in fresh_rows(spec, task, rows))
        (folder / "search.jsonl").write_text(lines, encoding="utf-8")
        (folder / "test.jsonl").symlink_to(zoo / "data" / task / "test.jsonl")
    return dataclasses.replace(pool, variables={**pool.variables, "zoo_dir": str(root)})


def one_search(cfg, pool: Pool, run_dir: Path) -> dict:
    """One search under cfg.fitness: its cost, its best recipe and that recipe's per-row outcomes on test."""
    problem, make_optimizer = ps.make_problem(cfg, pool)
    problem.load()
    _ = problem.evaluator  # its prompts encoded before the clock starts, as in any run
    schedule = fitness_schedule(OmegaConf.to_container(cfg.fitness))
    race = None if schedule is None else ps.make_race(cfg, problem, schedule, make_optimizer().parents)
    started = time.perf_counter()
    result = run_search(run_dir, problem, make_optimizer, {"bench": "fitness"}, Budget(int(cfg.search.generations)),
                        executor=SerialExecutor(problem), race=race, progress=False)
    seconds = time.perf_counter() - started
    fresh = [e for e in result.entries if not e["cached"] and e["error"] is None]
    best = problem.decode(np.asarray(result.best["genome"]))
    test = problem.test_evaluator.evaluate(problem.merger.merge(best), model_key=best.hash)
    values, outcomes = row_values(problem.task, test.samples, "score")
    return {"answers": sum(told["answers"] for told in load_checkpoint(run_dir)["history"]),
            "tokens": sum(e["metrics"].get("tokens", 0) for e in fresh), "seconds": round(seconds, 1),
            "candidates": len(result.entries), "confirmed": sum(e["confirmed"] for e in fresh),
            "best_search": result.best["fitness"][0], "best_test": test.metrics["score"],
            "test_values": values, "test_outcomes": outcomes}


def wilson(outcomes: list[bool]) -> tuple[float, float]:
    interval = stats.binomtest(sum(outcomes), len(outcomes)).proportion_ci(0.95, method="wilson")
    return interval.low, interval.high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--rows", type=int, default=500, help="search questions per task")
    parser.add_argument("--racing", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="a racing schedule to compare (fitness.<key> overrides; repeat for several); "
                             "default: the packaged fitness=racing, and with rows=informative")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. zoo=micro home=/tmp/h)")
    args = parser.parse_args()
    schedules = {"full": ["fitness=full"]}
    for spec in args.racing or ["", "rows=informative"]:
        overrides = [f"fitness.{pair}" for pair in spec.split(",") if pair]
        schedules["racing" + (f" ({spec})" if spec else "")] = ["fitness=racing", *overrides]
    base = [f"search.generations={args.generations}", f"search.popsize={args.popsize}", *args.overrides]
    cfg = load_config(base)
    runs: dict[str, list[dict]] = {name: [] for name in schedules}
    with tempfile.TemporaryDirectory(prefix="bench_fitness_") as tmp:
        pool = zoo_view(cfg, resolve_pool(cfg), args.rows, Path(tmp) / "zoo")
        for seed in args.seeds:
            for name, overrides in schedules.items():
                run_cfg = load_config([*base, f"search.seed={seed}", *overrides])
                runs[name].append(one_search(run_cfg, pool, Path(tmp) / f"{name}-{seed}"))
                print(f"seed {seed} {name}: {json.dumps({k: v for k, v in runs[name][-1].items() if not k.startswith('test_')})}",
                      flush=True)
    full = runs["full"]
    print(f"\ntoy zoo, toy_two_skill, {args.rows} search rows per task, popsize {args.popsize} x {args.generations} "
          f"generations, seeds {args.seeds}, {os.cpu_count()} cores; ratios are full / racing, same run")
    header = f"{'schedule':<28}{'answers':>10}{'tokens':>11}{'wall s':>9}{'answers x':>11}{'tokens x':>10}{'wall x':>8}"
    print(header + f"{'confirmed':>11}{'best search':>13}")
    for name, results in runs.items():
        total = {key: sum(r[key] for r in results) for key in ("answers", "tokens", "seconds", "confirmed", "candidates")}
        reference = {key: sum(r[key] for r in full) for key in ("answers", "tokens", "seconds")}
        print(f"{name:<28}{total['answers']:>10,}{total['tokens']:>11,}{total['seconds']:>9.0f}"
              f"{reference['answers'] / total['answers']:>10.1f}x{reference['tokens'] / total['tokens']:>9.1f}x"
              f"{reference['seconds'] / total['seconds']:>7.1f}x{total['confirmed']:>6}/{total['candidates']:<4}"
              f"{np.mean([r['best_search'] for r in results]):>13.3f}")
    print("\nbest recipe on test (toy_two_skill score, Wilson 95% interval of its pooled outcomes in brackets):")
    for index, seed in enumerate(args.seeds):
        reference = full[index]
        line = f"  seed {seed}: full {reference['best_test']:.3f} [{wilson(reference['test_outcomes'])[0]:.3f}, " \
               f"{wilson(reference['test_outcomes'])[1]:.3f}]"
        for name in list(runs)[1:]:
            mine = runs[name][index]
            paired = paired_comparison(mine["test_values"], mine["test_outcomes"], reference["test_values"],
                                       reference["test_outcomes"])
            line += (f"; {name} {mine['best_test']:.3f}, minus full {paired['difference']:+.3f} "
                     f"[{paired['ci95'][0]:+.3f}, {paired['ci95'][1]:+.3f}] p={paired['mcnemar_p']:.3g}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
