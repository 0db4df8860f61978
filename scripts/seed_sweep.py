"""Seed sweep of the default toy zoo's recipe: is the default zoo a typical build or a lucky one?

For each seed, `evomerge search zoo.seed=<seed>` builds that zoo (evomerge/conf/zoo/full.yaml, only the seed
changed; a zoo already in the home is reused) and runs the default search. The sweep then reads, per seed, the
zoo's gates (evomerge.zoo.report.GATES), the build time, and the search's margin on the test split: the best
recipe's fitness minus the best uniform baseline's. It prints one markdown row per seed and the pass rate, the
mean margin with its t-based 95% interval over seeds, and the spread (standard deviation); JSON goes to --out.

usage: python scripts/seed_sweep.py [--seeds 0 1 2 3 4] [--home ~/.cache/evomerge] [--out outputs/seed_sweep]
One zoo build is ~9 min and one search ~3 min on 2 cores: five seeds take about an hour (fewer if zoos are cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from scipy import stats

from evomerge.resources import CONF_DIR
from evomerge.zoo.build import ZooSpec, zoo_dir
from evomerge.zoo.report import gate_results


def run_seed(seed: int, home: Path, out: Path) -> dict:
    run_dir = out / f"seed{seed}"
    spec = ZooSpec.from_dict({**yaml.safe_load((CONF_DIR / "zoo" / "full.yaml").read_text()), "seed": seed})
    started = time.perf_counter()
    command = [sys.executable, "-m", "evomerge.cli", "search", f"zoo.seed={seed}", f"home={home}",
               f"hydra.run.dir={run_dir}", "progress=false"]
    if (run_dir / "checkpoint.json").is_file():
        command.append(f"resume={run_dir}")
    if not (run_dir / "report.json").is_file():
        subprocess.run(command, check=True)
    zoo = zoo_dir(spec, home)
    report = json.loads((zoo / "zoo_report.json").read_text())
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    best = next(r for r in rows if r["kind"] == "best")["metrics"]["fitness"]
    baseline = max((r for r in rows if r["kind"] == "baseline"), key=lambda r: r["metrics"]["fitness"])
    gates = gate_results(report)
    return {"seed": seed, "zoo": str(zoo), "gates": gates, "passed": all(gates.values()),
            "probe": report["merge_probe"]["tasks"]["toy_two_skill"]["score"],
            "experts": {name: report["models"][name]["toy_two_skill"]["score"] for name in ("ja_expert", "math_expert")},
            "best": best, "best_baseline": baseline["name"], "baseline": baseline["metrics"]["fitness"],
            "margin": round(best - baseline["metrics"]["fitness"], 4),
            "build_seconds": json.loads((zoo / "build.json").read_text())["seconds"] if (zoo / "build.json").is_file() else None,
            "sweep_seconds": round(time.perf_counter() - started, 1)}


def summary(results: list[dict]) -> str:
    margins = [r["margin"] for r in results]
    mean = statistics.fmean(margins)
    spread = statistics.stdev(margins) if len(margins) > 1 else 0.0
    low, high = (stats.t.interval(0.95, len(margins) - 1, loc=mean, scale=stats.sem(margins))
                 if len(margins) > 1 and spread > 0 else (mean, mean))
    lines = ["| seed | gates | failed gates | probe (test) | best expert | best search (test) | best uniform (test) | margin |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        failed = "; ".join(name for name, ok in r["gates"].items() if not ok) or "-"
        lines.append(f"| {r['seed']} | {'pass' if r['passed'] else 'FAIL'} | {failed} | {r['probe']:.3f} | "
                     f"{max(r['experts'].values()):.3f} | {r['best']:.3f} | {r['baseline']:.3f} ({r['best_baseline']}) | "
                     f"{r['margin']:+.3f} |")
    passed = sum(r["passed"] for r in results)
    lines.append(f"\ngates passed: {passed} of {len(results)} seeds; search margin over the best uniform merge: "
                 f"mean {mean:+.3f} (95% t-interval over seeds [{low:+.3f}, {high:+.3f}]), standard deviation "
                 f"{spread:.3f}, range [{min(margins):+.3f}, {max(margins):+.3f}]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--home", type=Path, default=Path("~/.cache/evomerge").expanduser())
    parser.add_argument("--out", type=Path, default=Path("outputs/seed_sweep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.home, args.out))
        (args.out / "seed_sweep.json").write_text(json.dumps(results, indent=2))
        print(summary(results), flush=True)


if __name__ == "__main__":
    main()
