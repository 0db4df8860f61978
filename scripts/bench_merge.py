"""Benchmark evomerge's merge engine against mergekit and a streaming I/O floor.

Builds a base and 3 fine-tunes of a Mistral-shaped model in bf16 (random weights plus small random deltas) in a
temporary directory -- ~200M parameters each by default, ``--pool mistral-1b`` for ~1B each (base + 3 = 8 GB) --
then times, each in a fresh process pinned to 2 torch threads (``--threads``):

* evomerge disk->disk TIES, DARE-TIES and task arithmetic (``merge_to_disk``);
* mergekit on the same configs (``run_merge``, what ``mergekit-yaml`` calls), when mergekit is installed;
* a floor: read every tensor of the 4 checkpoints, sum, write -- no merge math at all;
* the in-memory candidate merge (``InMemoryMerger.merge``) for random per-group recipes, with the process's
  peak RSS and the bytes it holds per pool parameter (``--memory-only``: just this part);
* ``--search``: a real ``evomerge search`` (TIES, 2 generations of 4 candidates, dtype=bfloat16) over the built pool
  on MGSM-JA rows (a small tokenizer trained on MGSM text is saved with each model; 2 search rows, 2 test rows,
  8 new tokens, so the time goes to merging and a few forward passes), with its wall time and peak RSS.

Times cover the merge call itself (imports and process start excluded, for both tools).  Each evomerge
process first merges a small warm-up checkpoint set so the one-off ``torch.compile`` of the fused kernels
(cached on disk by inductor across processes) is reported separately as ``evomerge_warmup_s``.
Both tools compute in float32 and write bf16 (mergekit: ``dtype: float32``, ``out_dtype: bfloat16``);
DARE uses L1 rescaling, mergekit's default.  Peak RSS is each child process's own high-water mark (VmHWM), so
every number is one run's; the in-memory child also reports its RSS after imports and the warm-up merges
(``baseline``), so ``peak - baseline`` is what the merger itself holds.

Run under the shared heavy-job lock:  flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/bench_merge.py
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

THREADS = 2
METHODS = ("ties", "dare_ties", "task_arithmetic")
WEIGHTS = [0.5, 0.3, 0.2]
DENSITY = 0.5
SHAPE = {  # Mistral layout at ~200M parameters
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 10,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
MISTRAL_1B = {  # Mistral layout at ~1.0B parameters (base + 3 fine-tunes: 8 GB in bf16)
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 7168,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
POOLS = {"mistral-200m": SHAPE, "mistral-1b": MISTRAL_1B}
WARMUP_SHAPE = {**SHAPE, "vocab_size": 9000, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}
DELTA_STD = 0.002  # fine-tune noise (weights have std 0.02); bf16 fine-tunes often move by ~1e-4, which ties a lot


# --------------------------------------------------------------------------- checkpoints


def mistral_layout(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layout = [("model.embed_tokens.weight", (shape["vocab_size"], hidden))]
    for layer in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        layout += [
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
        ]
    return layout + [("model.norm.weight", (hidden,)), ("lm_head.weight", (shape["vocab_size"], hidden))]


def build_zoo(root: Path, shape: dict, seed: int, delta_std: float = DELTA_STD) -> dict[str, Path]:
    """A base and 3 fine-tunes (base + small noise), bf16 safetensors in 200 MB shards plus config.json."""
    from transformers import MistralConfig

    from evomerge.modelio import ShardedSafetensorsWriter

    layout = mistral_layout(shape)
    config = MistralConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["MistralForCausalLM"]
    paths = {name: root / name for name in ("base", "ft1", "ft2", "ft3")}
    writers = {}
    for name, path in paths.items():
        path.mkdir(parents=True)
        config.save_pretrained(path)
        writers[name] = ShardedSafetensorsWriter(
            path, [(tensor, torch.bfloat16, size) for tensor, size in layout], 200 * 1024**2)
    generator = torch.Generator().manual_seed(seed)
    for tensor, size in layout:
        base = torch.randn(size, generator=generator) * 0.02
        writers["base"].write(tensor, base.to(torch.bfloat16))
        for name in ("ft1", "ft2", "ft3"):
            writers[name].write(tensor, (base + torch.randn(size, generator=generator) * delta_std).to(torch.bfloat16))
    for writer in writers.values():
        writer.close()
    return paths


def recipe_for(method: str, zoo: dict[str, Path]):
    """A uniform recipe of ``method`` over the fine-tunes (the first two for two-model methods): weights
    0.5/0.3/0.2 and density 0.5 where the method has them, its defaults elsewhere; DARE with L1 rescaling."""
    from evomerge.merge.methods import METHODS
    from evomerge.recipe import PSRecipe

    spec = METHODS[method]
    models = [zoo["ft1"], zoo["ft2"], zoo["ft3"]][: spec.n_models[1] or 3]
    values = {key: value for key, value in (("weight", WEIGHTS[: len(models)]), ("density", DENSITY))
              if key in spec.per_model}
    parameters = {"rescale": "l1"} if spec.options.get("rescale") == "dare" else {}
    return PSRecipe.uniform(method, zoo["base"] if spec.takes_base else None, models, parameters=parameters,
                            **values)


def mergekit_config(method: str, zoo: dict[str, Path]) -> dict:
    """The same merge as mergekit runs it: evomerge's own export of ``recipe_for``."""
    from evomerge.export import mergekit_config as exported

    return exported(recipe_for(method, zoo))


def all_methods() -> list[str]:
    """Every registered method that mergekit has and that needs no prompt statistics."""
    from evomerge.merge.methods import METHODS

    return [name for name, spec in sorted(METHODS.items()) if spec.mergekit.name and spec.statistics is None]


# --------------------------------------------------------------------------- child processes


def _status_mb(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would include the parent's peak before fork)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    current = _status_mb("VmRSS")
    return current if current is not None else peak_rss_mb()


def child_evomerge(method: str, zoo: dict[str, Path], warmup: dict[str, Path], out: Path) -> dict:
    from evomerge.merge.stream import merge_to_disk

    start = time.perf_counter()
    merge_to_disk(recipe_for(method, warmup), out.with_name(out.name + "-warmup"))
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    merge_to_disk(recipe_for(method, zoo), out)
    return {"seconds": time.perf_counter() - start, "warmup_s": warmup_s}


def child_mergekit(method: str, zoo: dict[str, Path], out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(mergekit_config(method, zoo))
    start = time.perf_counter()
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False))  # the zoo has no tokenizer
    return {"seconds": time.perf_counter() - start}


def child_floor(zoo: dict[str, Path], out: Path) -> dict:
    """Streaming read-sum-write with the same reader and writer: the I/O cost any merge must pay."""
    from evomerge.modelio import CheckpointReader, ShardedSafetensorsWriter

    start = time.perf_counter()
    readers = [CheckpointReader(zoo[name]) for name in ("base", "ft1", "ft2", "ft3")]
    out.mkdir()
    layout = [(name, entry.dtype, entry.shape) for name, entry in readers[0].entries.items()]
    writer = ShardedSafetensorsWriter(out, layout)
    for name in readers[0].names:
        total = readers[0].read(name).float()
        for reader in readers[1:]:
            total += reader.read(name)
        writer.write(name, total.to(torch.bfloat16))
    writer.close()
    return {"seconds": time.perf_counter() - start}


def child_memory(zoo: dict[str, Path], warmup: dict[str, Path], candidates: int, methods: list[str],
                 disk_ties: Path | None) -> dict:
    """Prepare an InMemoryMerger once, then time random per-group candidates for each method."""
    import gc

    from evomerge.merge.memory import InMemoryMerger
    from evomerge.merge.groups import group_names
    from evomerge.modelio import CheckpointReader
    from evomerge.search.genome import PSGenomeSpace

    small = InMemoryMerger(warmup["base"], [warmup["ft1"], warmup["ft2"], warmup["ft3"]])
    for method in methods:  # compile the kernels once, on small tensors, before the baseline is taken
        small.merge(recipe_for(method, warmup))
    del small
    gc.collect()
    baseline = rss_mb()
    models = [zoo["ft1"], zoo["ft2"], zoo["ft3"]]
    start = time.perf_counter()
    merger = InMemoryMerger(zoo["base"], models)
    result: dict = {"load_s": time.perf_counter() - start, "baseline_rss_mb": baseline, "methods": {}}
    result["pool_mb"] = sum(tensor.nbytes for tensor in merger._base.values()) / 2**20
    result["pool_mb"] += sum(tensor.nbytes for pool in merger._pool for tensor in pool.values()) / 2**20
    result["resident_mb"] = sum(tensor.nbytes for tensor in merger._targets.values()) / 2**20
    result["after_load_rss_mb"] = rss_mb()
    rng = random.Random(0)
    layers = json.loads((zoo["base"] / "config.json").read_text())["num_hidden_layers"]
    groups = group_names(layers, min(5, layers))
    for method in methods:
        reference = recipe_for(method, zoo)  # its models and options; random values from the method's genome
        space = PSGenomeSpace(method, reference.base, reference.models, tuple(groups), dict(reference.parameters)) \
            if reference.spec.values else None  # model_stock has nothing to search: its one recipe, timed

        def candidate():
            return reference if space is None else space.decode([rng.random() for _ in range(space.dim)])

        start = time.perf_counter()
        merger.merge(candidate())  # includes one-off preparation (magnitude tables for TIES)
        first = time.perf_counter() - start
        times = []
        for _ in range(candidates):
            recipe = candidate()
            start = time.perf_counter()
            merger.merge(recipe)
            times.append(time.perf_counter() - start)
        result["methods"][method] = {"first_s": first, "median_s": statistics.median(times), "runs": times}
    result["tables_mb"] = sum(table.nbytes for tables in getattr(merger, "_tables", {}).values()
                              for table in tables) / 2**20
    result["peak_rss_mb"] = peak_rss_mb()  # before the check below reads a second model
    if disk_ties is not None:  # the same recipe must give the disk path's tensors bit for bit
        state = merger.merge(recipe_for("ties", zoo)).state_dict()
        disk = CheckpointReader(disk_ties)
        result["ties_equals_disk"] = all(torch.equal(state[name], disk.read(name)) for name in disk.names)
    return result


SEARCH_ROWS = 2  # MGSM-JA rows in each split of the --search run: the first for test, the next for search


def child_search(zoo: dict[str, Path], work: Path) -> dict:
    """`evomerge search` over the pool, in this process (so its peak RSS is this child's), on a few MGSM-JA rows."""
    from evomerge.cli import main as evomerge_main
    from evomerge.resources import DATA_DIR
    from evomerge.zoo.tokenizer import train_tokenizer

    rows = (DATA_DIR / "mgsm" / "mgsm_ja.tsv").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(rows + (DATA_DIR / "mgsm" / "mgsm_en.tsv").read_text(encoding="utf-8").splitlines(),
                                vocab_size=1000)
    for path in zoo.values():
        tokenizer.save_pretrained(path)
    data = work / "mgsm"
    data.mkdir()
    (data / "mgsm_ja.tsv").write_text("\n".join(rows[:SEARCH_ROWS]) + "\n", encoding="utf-8")
    (data / "search.tsv").write_text("\n".join(rows[SEARCH_ROWS:2 * SEARCH_ROWS]) + "\n", encoding="utf-8")
    models = ",".join(str(zoo[name]) for name in ("ft1", "ft2", "ft3"))
    start = time.perf_counter()
    evomerge_main(["search", "pool=evollm_jp", f"pool.base={zoo['base']}", f"pool.models=[{models}]",
                   "pool.names=[ft1,ft2,ft3]", "task=mgsm_ja", f"mgsm_dir={data}",
                   f"mgsm_search_file={data / 'search.tsv'}", "task.max_new_tokens=8", "merge=ties",
                   "dtype=bfloat16", "search.popsize=4", "search.generations=2", "progress=false",
                   f"hydra.run.dir={work / 'search'}"])
    report = json.loads((work / "search" / "report.json").read_text())
    return {"seconds": time.perf_counter() - start, "evaluations": report["search"]["evaluations"],
            "rows": [(row["name"], row["metrics"]["fitness"]) for row in report["rows"]]}


def run_child(arguments: list[str]) -> dict:
    """Run this script in child mode in a fresh process; return its JSON result (with its peak RSS)."""
    command = [sys.executable, __file__, "--threads", str(THREADS), "--child", *arguments]
    completed = subprocess.run(command, stdout=subprocess.PIPE, check=True)
    return json.loads(completed.stdout.decode().strip().splitlines()[-1])


def child_main(arguments: list[str]) -> None:
    torch.set_num_threads(THREADS)
    mode, work = arguments[0], Path(arguments[1])
    if mode == "build":
        shape, delta_std = json.loads(arguments[2]), float(arguments[3])
        build_zoo(work / "zoo", shape, seed=0, delta_std=delta_std)
        build_zoo(work / "warmup", WARMUP_SHAPE, seed=1, delta_std=delta_std)
        print(json.dumps({}))
        return
    zoo = {name: work / "zoo" / name for name in ("base", "ft1", "ft2", "ft3")}
    warmup = {name: work / "warmup" / name for name in zoo}
    if mode == "evomerge":
        result = child_evomerge(arguments[2], zoo, warmup, work / "out" / f"evomerge-{arguments[2]}")
    elif mode == "mergekit":
        result = child_mergekit(arguments[2], zoo, work / "out" / f"mergekit-{arguments[2]}")
    elif mode == "floor":
        result = child_floor(zoo, work / "out" / "floor")
    elif mode == "search":
        result = child_search(zoo, work)
    else:
        disk_ties = work / "out" / "evomerge-ties"
        result = child_memory(zoo, warmup, int(arguments[2]), arguments[3].split(","),
                              disk_ties if disk_ties.exists() else None)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(json.dumps(result))


# --------------------------------------------------------------------------- report


def mergekit_available() -> bool:
    try:
        import mergekit.merge  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False
    return True


def memory_lines(result: dict) -> list[str]:
    memory = result["in_memory"]
    pool_parameters = 4 * result["parameters"]
    merger_mb = memory["peak_rss_mb"] - memory["baseline_rss_mb"]
    lines = [
        f"In-memory merger (median of {memory['candidates']} random per-group candidates; the first candidate "
        "includes one-off preparation):",
        f"  peak RSS {memory['peak_rss_mb']:.0f} MB = {memory['peak_rss_mb'] * 2**20 / pool_parameters:.2f} bytes "
        f"per pool parameter ({pool_parameters / 1e6:.0f}M: base + 3 models); process baseline after imports and "
        f"compiling {memory['baseline_rss_mb']:.0f} MB; the merger's own peak {merger_mb:.0f} MB = "
        f"{merger_mb * 2**20 / pool_parameters:.2f} bytes per pool parameter",
        f"  pool {memory['pool_mb']:.0f} MB + resident candidate {memory['resident_mb']:.0f} MB "
        f"(+10%: {1.1 * (memory['pool_mb'] + memory['resident_mb']):.0f} MB); magnitude tables "
        f"{memory['tables_mb']:.1f} MB; RSS after loading {memory['after_load_rss_mb']:.0f} MB",
        "",
        "| method | candidate (s) | first candidate (s) |",
        "|---|---|---|",
    ]
    for method, row in memory["methods"].items():
        lines.append(f"| {method} | {row['median_s']:.2f} | {row['first_s']:.1f} |")
    return lines


def table(result: dict) -> str:
    lines = [
        "| method | evomerge (s) | mergekit (s) | floor (s) | mergekit / evomerge | evomerge / floor "
        "| evomerge RSS (MB) | mergekit RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in result["methods"].items():
        ours, mergekit, mergekit_rss = row["evomerge_s"], row["mergekit_s"], row["mergekit_rss_mb"]
        mergekit_text = f"{mergekit:.1f}" if mergekit else "n/a"
        speedup = f"{mergekit / ours:.1f}x" if mergekit else "n/a"
        mergekit_rss_text = f"{mergekit_rss:.0f}" if mergekit_rss else "n/a"
        lines.append(
            f"| {method} | {ours:.1f} | {mergekit_text} | {row['floor_s']:.1f} | {speedup} "
            f"| {ours / row['floor_s']:.2f}x | {row['evomerge_rss_mb']:.0f} | {mergekit_rss_text} |"
        )
    return "\n".join((lines + [""] if result["methods"] else []) + memory_lines(result))


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--workdir", type=Path, help="where to build checkpoints (default: a temporary directory)")
    parser.add_argument("--pool", choices=sorted(POOLS), default="mistral-200m",
                        help="model shape: ~200M (default) or ~1B parameters per model")
    parser.add_argument("--candidates", type=int, default=5, help="in-memory candidates timed per method")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to time, or 'all' (every method mergekit also has)")
    parser.add_argument("--delta-std", type=float, default=DELTA_STD,
                        help="std of the fine-tunes' random deltas (weights have std 0.02)")
    parser.add_argument("--memory-only", action="store_true", help="only the in-memory merger (no disk merges)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if it is installed")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: the pool's; fewer for a smoke run)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads per child (2: the 2-core reference machine; on a machine shared with "
                             "other jobs, 1 avoids waiting for a busy core at every parallel region)")
    parser.add_argument("--search", action="store_true",
                        help="also run a 2-generation TIES evomerge search over the pool (bf16), with its peak RSS")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    THREADS = args.threads
    if args.child:
        child_main(args.child)
        return
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    methods = all_methods() if args.methods == "all" else args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="evomerge-bench-", dir=args.workdir))
    try:
        start = time.perf_counter()
        shape = dict(POOLS[args.pool])
        if args.layers is not None:
            shape["num_hidden_layers"] = args.layers
        run_child(["build", str(work), json.dumps(shape), str(args.delta_std)])  # in a child: this process stays small
        (work / "out").mkdir()
        parameters = sum(torch.Size(size).numel() for _, size in mistral_layout(shape))
        log(f"built base + 3 fine-tunes, {parameters / 1e6:.0f}M parameters each, "
            f"in {time.perf_counter() - start:.0f}s")
        result: dict = {"parameters": parameters, "pool": args.pool, "delta_std": args.delta_std, "threads": THREADS,
                        "methods": {}}
        if not args.memory_only:
            use_mergekit = not args.no_mergekit and mergekit_available()
            floor = run_child(["floor", str(work)])
            log(f"floor: {floor['seconds']:.1f}s")
            for method in methods:
                ours = run_child(["evomerge", str(work), method])
                log(f"evomerge {method}: {ours['seconds']:.1f}s (warm-up {ours['warmup_s']:.1f}s)")
                theirs = run_child(["mergekit", str(work), method]) if use_mergekit else None
                if theirs:
                    log(f"mergekit {method}: {theirs['seconds']:.1f}s")
                    shutil.rmtree(work / "out" / f"mergekit-{method}")
                result["methods"][method] = {
                    "evomerge_s": ours["seconds"],
                    "mergekit_s": theirs["seconds"] if theirs else None,
                    "floor_s": floor["seconds"],
                    "evomerge_rss_mb": ours["peak_rss_mb"],
                    "mergekit_rss_mb": theirs["peak_rss_mb"] if theirs else None,
                    "evomerge_warmup_s": ours["warmup_s"],
                    "floor_rss_mb": floor["peak_rss_mb"],
                }
        memory = run_child(["memory", str(work), str(args.candidates), ",".join(methods)])
        memory["candidates"] = args.candidates
        memory["bytes_per_pool_parameter"] = memory["peak_rss_mb"] * 2**20 / (4 * parameters)
        memory["merger_bytes_per_pool_parameter"] = (
            (memory["peak_rss_mb"] - memory["baseline_rss_mb"]) * 2**20 / (4 * parameters))
        result["in_memory"] = memory
        if "ties" in memory["methods"]:
            result["in_memory_merge_s"] = memory["methods"]["ties"]["median_s"]
        if args.search:
            search = run_child(["search", str(work)])
            search["bytes_per_pool_parameter"] = search["peak_rss_mb"] * 2**20 / (4 * parameters)
            search["pool_mb"] = 4 * parameters * 2 / 2**20
            result["search"] = search
            log(f"evomerge search (TIES, bf16, {search['evaluations']} candidates + the held-out report): "
                f"{search['seconds']:.0f}s, peak RSS {search['peak_rss_mb'] / 1024:.2f} GiB = "
                f"{search['bytes_per_pool_parameter']:.2f} bytes per pool parameter (pool {search['pool_mb'] / 1024:.2f} "
                f"GiB in bf16 + one resident candidate {search['pool_mb'] / 4 / 1024:.2f} GiB: "
                f"{search['peak_rss_mb'] / (1.25 * search['pool_mb']):.3f}x those)")
        print(json.dumps(result) if args.json else table(result))
        if not args.json and "ties_equals_disk" in memory:
            print(f"\nin-memory TIES candidate equals the disk merge bit for bit: {memory['ties_equals_disk']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
