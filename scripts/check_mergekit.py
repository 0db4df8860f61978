"""Every merge method on the toy zoo's models at bf16, against mergekit 0.1.5 tensor for tensor.

The zoo's base and two experts are written as bf16 checkpoints; for each method evomerge merges a recipe with
different values in every layer group (disk -> disk), evomerge's own export of that recipe runs through mergekit,
and the two checkpoints are compared tensor by tensor: the share of entries that differ, how many of those differ
by more than one bf16 rounding of the larger value, and the mean signed difference relative to the mean task-vector
magnitude (for the methods whose drops are random, DARE and DELLA, the two tools agree only in distribution: their
entries differ, the mean difference should not).  Ends with the export's notes for each method.

    .venv/bin/python scripts/check_mergekit.py --zoo ~/.cache/evomerge/zoo-full-<hash>
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODELS = ("base", "ja_expert", "math_expert")


def bf16_copy(source: Path, target: Path) -> Path:
    """``source`` with every floating tensor rounded to bf16 (config and tokenizer copied along)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(source / "model.safetensors")
    save_file({name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
               for name, tensor in tensors.items()}, target / "model.safetensors", metadata={"format": "pt"})
    return target


def recipe_for(method: str, paths: dict[str, Path], groups: tuple[str, ...]):
    """Two experts (and the base where the method takes one), values that differ per group and per model."""
    from evomerge.merge.methods import METHODS
    from evomerge.recipe import GroupValues, PSRecipe

    spec = METHODS[method]
    entries = []
    for index, name in enumerate(groups):
        share = 0.25 + 0.5 * index / max(1, len(groups) - 1)
        values = {key: [value.search[0] + (value.search[1] - value.search[0]) * (share + 0.1 * model)
                        for model in range(2)] for key, value in spec.per_model.items()}
        if method == "karcher":  # mergekit averages uniformly: equal weights keep the export exact
            values["weight"] = [values["weight"][0]] * 2
        values.update({key: value.search[0] + (value.search[1] - value.search[0]) * share
                       for key, value in spec.per_group.items()})
        entries.append(GroupValues(name, values))
    parameters = {"rescale": "l1"} if spec.options.get("rescale") == "dare" else {}
    return PSRecipe(method, (str(paths["ja_expert"]), str(paths["math_expert"])), tuple(entries),
                    str(paths["base"]) if spec.takes_base else None, parameters)


def compare(ours: Path, theirs: Path, base: Path) -> dict[str, float]:
    ours_t, theirs_t, base_t = (load_file(path / "model.safetensors") for path in (ours, theirs, base))
    entries = differing = beyond = 0
    signed, magnitude = 0.0, 0.0
    for name, reference in theirs_t.items():
        a, b = ours_t[name].float(), reference.float()
        if not reference.is_floating_point():
            continue
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7
        entries += a.numel()
        differing += int((a != b).sum())
        beyond += int(((a - b).abs() > ulp).sum())
        signed += float((a - b).double().sum())
        magnitude += float((b - base_t[name].float()).abs().double().sum())
    return {"entries": entries, "differing": differing / entries, "beyond_one_rounding": beyond / entries,
            "mean_difference_vs_task_vector": signed / magnitude if magnitude else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a toy zoo directory (base, ja_expert, math_expert)")
    parser.add_argument("--methods", help="comma-separated (default: every method mergekit also has)")
    args = parser.parse_args()

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from evomerge.export import mergekit_config, mergekit_notes
    from evomerge.merge.groups import group_names
    from evomerge.merge.methods import METHODS
    from evomerge.merge.stream import merge_to_disk
    from evomerge.modelio import read_config

    methods = args.methods.split(",") if args.methods else [
        name for name, spec in sorted(METHODS.items()) if spec.mergekit.name and spec.statistics is None]
    work = Path(tempfile.mkdtemp(prefix="evomerge-check-mergekit-"))
    try:
        paths = {name: bf16_copy(args.zoo / name, work / name) for name in MODELS}
        groups = tuple(group_names(read_config(paths["base"])["num_hidden_layers"], 2))
        print(f"toy zoo {args.zoo.name} in bf16, layer groups {', '.join(groups)}\n")
        print("| method | entries differing | beyond one bf16 rounding | mean difference / mean task-vector entry "
              "| export notes |")
        print("|---|---|---|---|---|")
        notes = {}
        for method in methods:
            recipe = recipe_for(method, paths, groups)
            ours = merge_to_disk(recipe, work / f"{method}-evomerge")
            options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
            run_merge(MergeConfiguration.model_validate(mergekit_config(recipe)), str(work / f"{method}-mergekit"),
                      options)
            found = compare(ours, work / f"{method}-mergekit", paths["base"])
            notes[method] = mergekit_notes(recipe)
            print(f"| {method} | {found['differing']:.2%} | {found['beyond_one_rounding']:.2%} | "
                  f"{found['mean_difference_vs_task_vector']:+.1e} | {len(notes[method])} |", flush=True)
            shutil.rmtree(ours)
            shutil.rmtree(work / f"{method}-mergekit")
        for method, lines in notes.items():
            for line in lines:
                print(f"\n{method}: {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
