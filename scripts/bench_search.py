"""Benchmark the search loop: candidates per minute with the serial executor and with Ray workers, on the toy zoo,
and how one candidate's time splits between merging (in memory) and evaluating (generation + scoring).

Both runs are the same search (same config and seed, each in a fresh temporary run directory), so their logs must
agree except for the `seconds` timings; the script checks that and reports it. Ray's start-up (a local instance
and its workers, each loading the pool) is timed apart from the search loop.

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/bench_search.py --json
    .venv/bin/python scripts/bench_search.py --generations 1 --popsize 4 --workers 2 zoo=micro   # any Hydra override

`--json` prints {"serial": {"candidates_per_min": ...}, "ray": {"candidates_per_min": ..., "workers": ...},
"merge_fraction": ...} with more detail beside those keys.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from evomerge.pool import resolve_pool
from evomerge.resources import CONF_MODULE
from evomerge.search import ps
from evomerge.search.executor import RayExecutor
from evomerge.search.run import Budget, SerialExecutor, run_search


def load_config(overrides: list[str]):
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["command=search", "progress=false", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def timed_search(cfg, pool, problem, make_optimizer, executor, run_dir: Path) -> dict:
    budget = Budget(int(cfg.search.generations))
    started = time.perf_counter()
    result = run_search(run_dir, problem, make_optimizer, {"bench": "search"}, budget, executor=executor,
                        progress=False)
    seconds = time.perf_counter() - started
    evaluated = [e for e in result.entries if not e["cached"]]
    timings = [e["seconds"] for e in evaluated if e["seconds"]]
    return {
        "candidates": len(result.entries),
        "evaluated": len(evaluated),
        "failed": sum(1 for e in result.entries if e["error"]),
        "search_seconds": round(seconds, 2),
        "candidates_per_min": round(len(evaluated) / seconds * 60, 1),
        "best_search_fitness": result.best["fitness"][0],
        "merge_seconds": round(sum(t["merge"] for t in timings), 3),
        "eval_seconds": round(sum(t["eval"] for t in timings), 3),
        "entries": result.entries,
    }


def without_seconds(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU each)")
    parser.add_argument("--serial-threads", type=int, default=None,
                        help="torch threads of the serial run (default: torch's, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. zoo=micro home=/tmp/h task=toy_ja_qa)")
    args = parser.parse_args()
    if args.serial_threads:
        torch.set_num_threads(args.serial_threads)
    cfg = load_config([f"search.generations={args.generations}", f"search.popsize={args.popsize}", *args.overrides])
    pool = resolve_pool(cfg)  # the toy zoo: built on first use, cached under `home`
    problem, make_optimizer = ps.make_problem(cfg, pool)
    report: dict = {"zoo": cfg.zoo.variant, "task": cfg.task.name, "merge": cfg.merge.method,
                    "generations": args.generations, "popsize": args.popsize, "cpu_count": os.cpu_count(),
                    "torch_threads_serial": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        serial = timed_search(cfg, pool, problem, make_optimizer, SerialExecutor(problem), Path(tmp) / "serial")
        started = time.perf_counter()
        executor = RayExecutor(functools.partial(ps.make_problem, cfg, pool), workers=args.workers, num_cpus=1)
        startup = time.perf_counter() - started
        try:
            parallel = timed_search(cfg, pool, problem, make_optimizer, executor, Path(tmp) / "ray")
        finally:
            executor.close()
    merge, evaluate = serial["merge_seconds"], serial["eval_seconds"]
    report["serial"] = {k: v for k, v in serial.items() if k != "entries"}
    report["ray"] = {**{k: v for k, v in parallel.items() if k != "entries"}, "workers": args.workers,
                     "startup_seconds": round(startup, 2), "threads_per_worker": 1}
    report["merge_fraction"] = round(merge / (merge + evaluate), 4)
    report["seconds_per_candidate"] = {
        name: {"merge": round(r["merge_seconds"] / r["evaluated"], 4), "eval": round(r["eval_seconds"] / r["evaluated"], 4)}
        for name, r in (("serial", serial), ("ray", parallel))}
    report["logs_identical_except_seconds"] = without_seconds(serial["entries"]) == without_seconds(parallel["entries"])
    if args.json:
        print(json.dumps(report))
        return
    print(f"toy zoo ({report['zoo']}), {report['task']}, {report['merge']}, {args.generations} generations x "
          f"{args.popsize} on {report['cpu_count']} cores")
    for name in ("serial", "ray"):
        r = report[name]
        extra = f", {args.workers} workers, start-up {r['startup_seconds']} s" if name == "ray" else ""
        print(f"{name:>7}: {r['candidates_per_min']:6.1f} candidates/min ({r['evaluated']} evaluated in "
              f"{r['search_seconds']} s{extra})")
    for name, per in report["seconds_per_candidate"].items():
        print(f"a candidate ({name}): merge {per['merge']} s + eval {per['eval']} s")
    print(f"merge fraction (serial): {report['merge_fraction']:.1%}")
    print(f"logs identical except seconds: {report['logs_identical_except_seconds']}")


if __name__ == "__main__":
    main()
