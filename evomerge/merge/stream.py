"""Disk -> disk merging: one parameter at a time from every input, so peak memory is a few tensors per model.

The output is assembled in a hidden temporary directory next to ``out`` and renamed into place only when
complete; on any error the temporary directory is removed and ``out`` is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge.groups import assign_groups
from evomerge.merge.methods import all_finite, merge_tensor
from evomerge.modelio import CheckpointReader, ShardedSafetensorsWriter, read_config
from evomerge.recipe import PSRecipe

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "evomerge_recipe.yaml"}


@dataclass
class MergeInputs:
    """Open readers for a recipe's checkpoints, checked to be mergeable with each other.

    ``readers[0]`` is the reference (the base, or the first model when the method takes no base); its tensor
    order, dtypes, config and tokenizer define the output.
    """

    paths: list[str]
    readers: list[CheckpointReader]
    has_base: bool

    @property
    def reference(self) -> CheckpointReader:
        return self.readers[0]

    @property
    def names(self) -> list[str]:
        return self.reference.names

    def read_checked(self, name: str, buffers: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Every input's tensor ``name`` (into ``buffers``, one per input, when given), refusing NaN or inf."""
        tensors = []
        for index, (path, reader) in enumerate(zip(self.paths, self.readers)):
            tensor = reader.read(name, None if buffers is None else buffers[index])
            if not all_finite(tensor):
                raise MergeError(f"model {path}: tensor {name!r} contains NaN or infinite values")
            tensors.append(tensor)
        return tensors

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def open_inputs(base: str | None, models: Sequence[str]) -> MergeInputs:
    """Open and cross-check checkpoints: same architecture and vocab, same tensor names and shapes."""
    paths = ([base] if base is not None else []) + list(models)
    readers: list[CheckpointReader] = []
    try:
        for path in paths:
            try:
                readers.append(CheckpointReader(path))
            except (FileNotFoundError, ValueError) as error:
                raise MergeError(f"model {path}: {error}") from error
        _check_configs(paths)
        _check_tensors(paths, readers)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return MergeInputs(paths, readers, base is not None)


def _check_configs(paths: Sequence[str]) -> None:
    reference_path, reference = paths[0], read_config(paths[0])
    reference_vocabulary = _tokenizer_vocabulary(reference_path)
    for path in paths[1:]:
        config = read_config(path)
        for key, what in (("model_type", "architecture"), ("architectures", "architecture"), ("vocab_size", "vocab size")):
            if key in reference and key in config and reference[key] != config[key]:
                raise MergeError(
                    f"model {path} has {what} {config[key]!r} but {reference_path} has {reference[key]!r}; "
                    "only models of one architecture and vocabulary can be merged"
                )
        vocabulary = _tokenizer_vocabulary(path)
        if vocabulary is not None and reference_vocabulary is not None and vocabulary != reference_vocabulary:
            raise MergeError(
                f"model {path} has a different tokenizer from {reference_path} (tokenizer.json vocabularies "
                "differ): a merge would mix embeddings of different tokens"
            )


def _tokenizer_vocabulary(path: str) -> dict | None:
    """The token -> id map of a checkpoint's tokenizer.json (with its added tokens), or None if it has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    vocabulary = dict((data.get("model") or {}).get("vocab") or {})
    vocabulary.update({token["content"]: token["id"] for token in data.get("added_tokens") or []})
    return vocabulary


def _check_tensors(paths: Sequence[str], readers: Sequence[CheckpointReader]) -> None:
    reference_path, reference = paths[0], readers[0].entries
    for path, reader in zip(paths[1:], readers[1:]):
        for name in reference:
            if name not in reader.entries:
                raise MergeError(f"model {path} is missing tensor {name!r} (present in {reference_path})")
        for name, entry in reader.entries.items():
            if name not in reference:
                raise MergeError(f"model {path} has tensor {name!r} that {reference_path} lacks")
            if entry.shape != reference[name].shape:
                raise MergeError(
                    f"tensor {name!r}: model {path} has shape {list(entry.shape)} but {reference_path} has "
                    f"{list(reference[name].shape)}"
                )


def check_recipe_fits(recipe: PSRecipe, names: Sequence[str]) -> dict[str, int]:
    """Map each tensor to its recipe group, refusing recipes whose groups do not cover the checkpoint."""
    try:
        return assign_groups(names, recipe.group_names)
    except MergeError as error:
        raise MergeError(f"recipe {recipe.hash} does not fit the checkpoint {recipe.base or recipe.models[0]}: {error}") from error


def needed_statistics(recipe: PSRecipe, device: str | torch.device = "cpu") -> Mapping[str, Sequence[Tensor]] | None:
    """The recipe's Fisher / Gram statistics (from the cache, or computed on ``device``), on the CPU."""
    if recipe.spec.statistics is None:
        return None
    from evomerge.merge.statistics import recipe_statistics

    return recipe_statistics(recipe, device=device)


def _prefetched(inputs: MergeInputs, names: Sequence[str]) -> Iterator[tuple[str, list[Tensor]]]:
    """Yield each name's input tensors while a worker thread already reads the next name's (reads release
    the GIL).  Two buffer sets take turns, so a yielded tensor stays valid until the next one is yielded."""
    size = max(reader.largest_tensor_bytes for reader in inputs.readers)
    buffer_sets = [[torch.empty(size, dtype=torch.uint8) for _ in inputs.readers] for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(inputs.read_checked, names[0], buffer_sets[0]) if names else None
        for index, name in enumerate(names):
            assert pending is not None
            tensors = pending.result()
            following = index + 1
            pending = (pool.submit(inputs.read_checked, names[following], buffer_sets[following % 2])
                       if following < len(names) else None)
            yield name, tensors


def merge_to_disk(
    recipe: PSRecipe,
    out: str | Path,
    *,
    statistics: Mapping[str, Sequence[Tensor]] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> Path:
    """Merge ``recipe`` into a loadable HF model directory at ``out`` (safetensors shards, config, tokenizer,
    and a README model card recording the recipe).  ``statistics`` overrides Fisher/Gram statistics that
    would otherwise be loaded from (or computed into) the recipe's statistics cache.  ``device``: where each
    tensor is merged (read and written through host memory one tensor at a time); the result equals an
    `InMemoryMerger` candidate on the same device bit for bit."""
    device = torch.device(device)
    out = Path(out)
    if out.exists() and not overwrite:
        raise MergeError(f"output {out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = open_inputs(recipe.base, recipe.models)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        assignment = check_recipe_fits(recipe, inputs.names)
        if statistics is None:
            statistics = needed_statistics(recipe, device=device)
        layout = [(name, entry.dtype, entry.shape) for name, entry in inputs.reference.entries.items()]
        writer = ShardedSafetensorsWriter(staging, layout, max_shard_bytes)
        output = torch.empty(inputs.reference.largest_tensor_bytes, dtype=torch.uint8, device=device)
        try:
            for name, tensors in _prefetched(inputs, inputs.names):
                tensors = [tensor.to(device) for tensor in tensors]
                base, models = (tensors[0], tensors[1:]) if inputs.has_base else (None, tensors)
                group = recipe.groups[assignment[name]]
                target = output[: tensors[0].nbytes].view(tensors[0].dtype).view(tensors[0].shape)
                with torch.no_grad():
                    merged = merge_tensor(recipe, group, name, base, models, out=target, statistics=statistics)
                writer.write(name, merged.cpu())
            writer.close()
        finally:
            writer.abort()
        _copy_side_files(Path(inputs.paths[0]), staging)
        (staging / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
        (staging / "README.md").write_text(model_card(recipe))
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        inputs.close()
    return out


def _copy_side_files(source: Path, destination: Path) -> None:
    """Config, generation config and tokenizer files come from the reference checkpoint."""
    for item in source.iterdir():
        if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, destination / item.name)


def move_into_place(staging: Path, out: Path) -> None:
    """Rename a finished ``staging`` directory to ``out``, replacing an existing ``out`` only once staging is complete."""
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def model_card(recipe: PSRecipe, scores: Mapping[str, object] | None = None, scores_caption: str = "",
               paired: Sequence[Mapping[str, Any]] = ()) -> str:
    """README for a merged model: method, sources and the full recipe; ``scores`` (metric -> value, e.g. the
    search's test metrics) adds a table under ``scores_caption`` saying where they come from, and ``paired`` the
    merge against each source and baseline on the same rows (`evomerge.eval.significance`)."""
    sources = "\n".join(f"- `{model}`" for model in recipe.models)
    if recipe.kind == "ps":
        how = f"Merged with **{recipe.method}** by evomerge. Base: {f'`{recipe.base}`' if recipe.base else 'none'}."
    else:
        how = (f"A **layer path** of {len(recipe.path)} blocks (data-flow merge) by evomerge; embeddings and head "
               f"from model {recipe.embed_from}; how to load it: see Format below.")
    card = f"---\ntags: [merge, evomerge]\n---\n\n# evomerge merge {recipe.hash}\n\n{how}\n\nModels:\n{sources}\n\n"
    if scores:
        rows = "".join(f"| {metric} | {value:.4f} |\n" if isinstance(value, float) else f"| {metric} | {value} |\n"
                       for metric, value in scores.items())
        card += f"## Scores\n\n{scores_caption}\n\n| metric | value |\n|---|---|\n{rows}\n"
    if paired:
        rows = "".join(f"| {e['against']} | {e['difference']:+.4f} | [{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}] | "
                       f"{e['mcnemar_p']:.3g} | {e['better']} / {e['worse']} |\n" for e in paired)
        card += (f"## Against the sources and baselines\n\nThis merge minus each model, paired on the same "
                 f"{paired[0]['n']} rows: the difference with its bootstrap 95% interval, McNemar's exact p-value, and "
                 "the rows only this merge / only the other model got right.\n\n| model | difference | 95% interval | "
                 f"p | rows |\n|---|---|---|---|---|\n{rows}\n")
    return card + f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
