"""Benchmark evomerge's answers to lm-eval's requests against lm-eval's own HF backend, on the same tasks and model.

Both evaluate the same loaded lm-eval tasks (tests/lm_eval_tasks: toy_arith, generate_until; toy_qa_choice,
multiple_choice, 4 log-likelihoods per row) on the same docs (the test cut, 60 + 60 rows) with the same model
object, through `lm_eval.evaluator.evaluate`; only the model interface differs. evomerge's first evaluation also
encodes the prompts, which a search does once; later ones reuse them, as every further candidate of a search does.
The HF backend runs at its default batch size (1) and at --hf-batch-size. Prints seconds (best of --repeats) and
the HF backend's time over evomerge's (warm), and checks that both give the same metrics.

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/bench_lm_eval.py          # the toy zoo's math expert
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM

from evomerge.eval.harness import HarnessEvaluator, HarnessSettings, HarnessTask
from evomerge.modelio import load_model, load_tokenizer
from evomerge.resources import CONF_DIR
from evomerge.zoo.build import ZooSpec, build_zoo

TASKS_DIR = Path(__file__).resolve().parent.parent / "tests" / "lm_eval_tasks"


def seconds(run, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` runs, and the last run's result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model directory (default: the toy zoo's math_expert, built if missing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        home = Path(os.environ.get("EVOMERGE_HOME", "~/.cache/evomerge")).expanduser()
        spec = ZooSpec.from_dict(yaml.safe_load((CONF_DIR / "zoo" / "full.yaml").read_text()))
        args.model = str(build_zoo(spec, home) / "math_expert")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    results = {"model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats, "tasks": {}}
    for names in (["toy_arith"], ["toy_qa_choice"], ["toy_arith", "toy_qa_choice"]):
        results["tasks"]["+".join(names)] = compare(model, tokenizer, names, args)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.model}, {results['threads']} threads, best of {args.repeats}; the test cut of each task (60 rows)")
    print("tasks                   rows  evomerge first / after (s)  " +
          "  ".join(f"HF batch {size} (s, x evomerge)" for size in (1, args.hf_batch_size)) + "  same metrics")
    for name, entry in results["tasks"].items():
        hf = "  ".join(f"{entry['hf'][size]['s']:>8.2f} {entry['hf'][size]['ratio']:>6.2f}x        "
                       for size in (1, args.hf_batch_size))
        same = all(entry["hf"][size]["same_metrics"] for size in entry["hf"])
        print(f"{name:<22} {entry['rows']:>5}  {entry['evomerge_first_s']:>10.2f} / {entry['evomerge_s']:<10.2f}  {hf}{same}")


def compare(model, tokenizer, names: list[str], args: argparse.Namespace) -> dict:
    """evomerge's evaluation of the tasks' test cut against the HF backend's at batch sizes 1 and --hf-batch-size."""
    task = HarnessTask(HarnessSettings.load({"name": "lm_eval", "tasks": names, "include_path": str(TASKS_DIR)}))
    evaluator = HarnessEvaluator(task, "test", tokenizer, progress=False)
    first, ours = seconds(lambda: evaluator.evaluate(model), 1)  # encodes the prompts
    warm, ours = seconds(lambda: evaluator.evaluate(model), args.repeats)
    entry = {"rows": ours.metrics["n"], "evomerge_first_s": round(first, 3), "evomerge_s": round(warm, 3), "hf": {}}
    for batch_size in (1, args.hf_batch_size):
        hf = HFLM(pretrained=model, tokenizer=load_tokenizer(args.model), batch_size=batch_size)
        took, theirs = seconds(lambda: evaluate(hf, task.loaded, samples=evaluator.indices, bootstrap_iters=0),
                               args.repeats)
        same = all(ours.metrics[f"{name}/{metric}"] == float(theirs["results"][name][f"{metric},{objective.filter}"])
                   for name, objective in task.objectives.items() for metric in task.tasks[name].aggregation())
        entry["hf"][batch_size] = {"s": round(took, 3), "ratio": round(took / warm, 2), "same_metrics": same}
    return entry

if __name__ == "__main__":
    main()
