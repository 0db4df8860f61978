"""`evomerge export`: a recipe as evomerge YAML, as a mergekit config and as a merged Hugging Face model.

The mergekit config lets anyone rebuild the model with ``mergekit-yaml``, without evomerge.  Per-group
values become mergekit conditional parameter lists: mergekit applies the first entry whose ``filter`` is a
substring of the tensor name, so the filters are derived from the checkpoint's own tensor names (a block's
name prefix such as ``model.layers.1.``, an embedding's full name) and checked to select exactly their
group's tensors; the head group, evomerge's catch-all, is the entry without a filter.  Where mergekit
cannot do what evomerge did (DARE's random masks, no Fisher/RegMean, which tied entries a TIES trim keeps in
half precision), the config is the closest one and carries ``# note:`` lines -- and `export` warns -- saying
what differs.  Each note was checked against mergekit 0.1.5's code: linear, task arithmetic, TIES (the same
k = int(density * numel) entries, the same sign election and normalisation) and slerp (whole-tensor norms and
dot product, the same eps and linear fallback) compute what evomerge computes.

A data-flow (DFS) recipe exports as its YAML and, by default, its path unrolled into a plain checkpoint of the
embedding owner's architecture (one layer per hop, input scales folded into the weights:
`evomerge.pathmodel.unroll_path_model`), which transformers or vLLM load without evomerge.  Where the folding
is not exact (a scale <= 0, an architecture that is not pre-norm RMSNorm), or with ``dfs_format="path"``, it is
evomerge's path format instead (each used block stored once, plus the hops; only `evomerge.modelio.load_model`
runs it right), with an `ExportWarning` when it was a fallback.  mergekit has no input-scaled layer paths, so
no config.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ExportError
from evomerge.merge.groups import assign_groups, tensor_place
from evomerge.merge.stream import merge_to_disk, model_card, move_into_place
from evomerge.modelio import DTYPES, CheckpointReader, load_model, load_tokenizer
from evomerge.pathmodel import recipe_path_model, save_path_model, unroll_obstacle, unroll_path_model
from evomerge.pool import check_placement
from evomerge.recipe import DFSRecipe, PSRecipe, load_recipe

RUN_RECIPE = "best_recipe.yaml"
DFS_RUN_RECIPE = "chosen_recipe.yaml"  # a DFS run exports its chosen point (best within the path-length limit)
RUN_REPORT = "report.json"
DFS_FORMATS = ("unrolled", "path")  # a plain checkpoint with the scales folded in; evomerge's blocks + hops


class ExportWarning(UserWarning):
    """The export is incomplete or inexact: the mergekit config differs from evomerge's merge, or no scores."""


@dataclass(frozen=True)
class CheckpointLayout:
    """What the mergekit mapping needs from the reference checkpoint: tensor names and floating dtypes."""

    names: tuple[str, ...]
    float_dtypes: tuple[str, ...]  # distinct, sorted: one entry for an ordinary checkpoint

    @classmethod
    def read(cls, path: str | Path) -> CheckpointLayout:
        try:
            reader = CheckpointReader(path)
        except (FileNotFoundError, ValueError) as error:
            raise ExportError(f"model {path}: {error}") from error
        try:
            dtypes = {str(entry.dtype).removeprefix("torch.") for entry in reader.entries.values()
                      if entry.dtype.is_floating_point}
            return cls(tuple(reader.names), tuple(sorted(dtypes)))
        finally:
            reader.close()


def reference_model(recipe: PSRecipe) -> str:
    """The checkpoint whose tensor names, dtypes, config and tokenizer the merged model takes (as in `merge_to_disk`)."""
    return recipe.base if recipe.base is not None else recipe.models[0]


def group_filters(group_names: Sequence[str], tensor_names: Sequence[str]) -> tuple[list[list[str]], int | None]:
    """Per recipe group, the mergekit filters selecting its tensors, and the index of the fallback group.

    Each filter is checked to be a substring of its own group's tensor names only, so the filters work in any
    order and any subset of them may be left to the fallback.  The fallback (no filter) is the group holding
    the head tensors -- in evomerge the head is whatever is neither an embedding nor in a block.
    """
    assignment = assign_groups(tensor_names, group_names)
    filters: list[list[str]] = [[] for _ in group_names]
    fallback = None
    for name in tensor_names:
        place, index = tensor_place(name), assignment[name]
        if place.kind == "head":
            fallback = index
            continue
        if place.kind == "block":  # the name up to its block index, e.g. "model.layers.1." (not "...layers.11.")
            marker = f".{place.block}."
            pattern = name[: name.index(marker) + len(marker)]
        else:
            pattern = name
        if pattern not in filters[index]:
            filters[index].append(pattern)
    for index, patterns in enumerate(filters):
        for pattern in patterns:
            strays = [name for name in tensor_names if pattern in name and assignment[name] != index]
            if strays:
                raise ExportError(
                    f"no exact mergekit filter for layer group {group_names[index]!r}: {pattern!r} also selects "
                    f"{strays[0]!r}"
                )
    return filters, fallback


def _setting(values: Sequence[float], filters: Sequence[Sequence[str]], fallback: int | None) -> float | list[dict]:
    """A mergekit parameter setting for one value per group: a scalar when all agree, else a conditional list
    naming only the groups whose value differs from the fallback's."""
    if len(set(values)) == 1:
        return values[0]
    default = None if fallback is None else values[fallback]
    conditions: list[dict[str, Any]] = [
        {"filter": pattern, "value": value}
        for patterns, value in zip(filters, values)
        if value != default
        for pattern in patterns
    ]
    if default is not None:
        conditions.append({"value": default})
    return conditions


def mergekit_config(recipe: PSRecipe, layout: CheckpointLayout | None = None) -> dict[str, Any]:
    """The mergekit config closest to ``recipe`` (exactly equivalent unless `mergekit_notes` lists a difference).

    ``layout`` describes the reference checkpoint; without it the checkpoint is read.  mergekit computes in
    float32, as evomerge does, and writes the checkpoint's dtype.
    """
    layout = layout or CheckpointLayout.read(reference_model(recipe))
    filters, fallback = group_filters(recipe.group_names, layout.names)
    mapping = recipe.spec.mergekit
    config: dict[str, Any] = {"merge_method": mapping.name or "linear"}
    if mapping.base_model == "first":
        config["base_model"] = recipe.models[0]
    elif recipe.base is not None:
        config["base_model"] = recipe.base
    config["dtype"] = "float32"
    if len(layout.float_dtypes) == 1:
        config["out_dtype"] = layout.float_dtypes[0]
    parameters = mapping.parameters(recipe.parameters)
    for key in recipe.spec.per_group:  # one value per layer group: a global mergekit parameter, filtered by group
        parameters[key] = _setting([float(group[key]) for group in recipe.groups], filters, fallback)
    config["parameters"] = parameters

    models = []
    for index, model in enumerate(recipe.models):
        entry: dict[str, Any] = {"model": model}
        per_model = {key: _setting([group[key][index] for group in recipe.groups], filters, fallback)
                     for key in recipe.spec.per_model if mapping.per_model is None or key in mapping.per_model}
        if per_model:
            entry["parameters"] = per_model
        models.append(entry)
    config["models"] = models
    return config


def mergekit_notes(recipe: PSRecipe, layout: CheckpointLayout | None = None) -> list[str]:
    """What mergekit does differently from evomerge for ``recipe``; empty when the two give the same tensors
    (up to float rounding)."""
    layout = layout or CheckpointLayout.read(reference_model(recipe))
    half = sorted(set(layout.float_dtypes) & {"bfloat16", "float16"})
    notes = recipe.spec.mergekit.notes(recipe, half)
    inputs = [*([recipe.base] if recipe.base is not None else []), *recipe.models]
    if len(set(inputs)) < len(inputs):
        notes.append("the recipe lists a model twice or its base among the models; mergekit identifies inputs "
                     "by path and merges each once")
    if len(layout.float_dtypes) > 1:
        notes.append(f"the checkpoint mixes dtypes {list(layout.float_dtypes)}; evomerge keeps each tensor's, "
                     "mergekit writes float32")
    return notes


def mergekit_yaml(recipe: PSRecipe, layout: CheckpointLayout | None = None) -> tuple[str, list[str]]:
    """The mergekit config as YAML with a header saying what it is and ``# note:`` lines for every
    difference from evomerge's merge; also returns the notes."""
    layout = layout or CheckpointLayout.read(reference_model(recipe))
    notes = mergekit_notes(recipe, layout)
    header = [
        f"# mergekit config for evomerge recipe {recipe.hash} ({recipe.method}); rebuild the model with",
        "#   mergekit-yaml mergekit.yaml <output-dir>",
        "# Per-layer-group values: the first `filter` contained in a tensor name applies, the entry without",
        "# a filter covers the rest (final norm, LM head).",
    ]
    if notes:
        header += [f"# note: {note}" for note in notes]
    else:
        header.append("# Rebuilds the same tensors as evomerge, up to float rounding.")
    body = yaml.safe_dump(mergekit_config(recipe, layout), sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body, notes


@dataclass(frozen=True)
class Scores:
    """Test metrics of the exported recipe and a caption saying where they come from, for the model card."""

    metrics: Mapping[str, Any]
    caption: str
    paired: Sequence[Mapping[str, Any]] = ()  # the recipe against each source and baseline (report.json `paired`)


def load_run(run_dir: Path) -> tuple[PSRecipe | DFSRecipe, Scores | None]:
    """A search run's result and, when its report scores that same recipe, its test metrics: the best recipe of
    a PS run, the chosen path of a DFS run, the chosen path of a PS+DFS run (in its `dfs/` stage)."""
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    for recipe_path in (run_dir / DFS_RUN_RECIPE, run_dir / "dfs" / DFS_RUN_RECIPE, run_dir / RUN_RECIPE):
        if recipe_path.is_file():
            break
    else:
        raise ExportError(f"{run_dir} has no {RUN_RECIPE}: not a search run directory, or no generation finished yet")
    recipe = load_recipe(recipe_path)
    report_path = run_dir / RUN_REPORT
    if not report_path.is_file():
        warnings.warn(f"{run_dir} has no {RUN_REPORT} (the search did not reach its test report); "
                      "the model card has no scores", ExportWarning, stacklevel=3)
        return recipe, None
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{report_path} is not valid JSON: {error}") from error
    kind = "best" if isinstance(recipe, PSRecipe) else report.get("search", {}).get("kind")
    best = next((row for row in report.get("rows", []) if row.get("kind") == kind), None)
    if best is None or best.get("recipe_hash", recipe.hash) != recipe.hash:
        what = "has no best row" if best is None else f"scores recipe {best['recipe_hash']}, not {recipe.hash}"
        warnings.warn(f"{report_path} {what}; the model card has no scores", ExportWarning, stacklevel=3)
        return recipe, None
    caption = (f"Scores of this recipe on the {report.get('split', 'test')} split of task `{report.get('task')}` "
               f"(fitness = `{report.get('objective')}`), from the search run's {RUN_REPORT}.")
    paired = [entry for entry in report.get("paired", []) if entry.get("model") == best["name"]]
    return recipe, Scores(dict(best["metrics"]), caption, paired)


def export(source: str | Path, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
           dfs_format: str = "unrolled") -> Path:
    """Write ``out/recipe.yaml``, ``out/mergekit.yaml`` and the merged model ``out/model/`` from a search run
    directory (its best recipe; the model card gets its test scores) or a recipe YAML file.

    Everything is staged next to ``out`` and renamed into place when complete, so a failed export leaves
    ``out`` as it was.  Differences between the mergekit config and evomerge's merge are `ExportWarning`s.
    ``device``: where the model is merged (tensor by tensor, through host memory).  ``dfs_format``: how a DFS
    recipe's model is written, one of `DFS_FORMATS` (see `export_path_model`).
    """
    if dfs_format not in DFS_FORMATS:
        raise ExportError(f"dfs_format must be one of {list(DFS_FORMATS)}, got {dfs_format!r}")
    source, out = Path(source), Path(out)
    if source.is_dir():
        recipe, scores = load_run(source)
    elif source.is_file():
        recipe, scores = load_recipe(source), None
    else:
        raise ExportError(f"{source} is neither a run directory nor a recipe file")
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists; pass overwrite=true to replace it")
    mergekit_text, notes = mergekit_yaml(recipe) if isinstance(recipe, PSRecipe) else (None, [])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    fallback = None
    try:
        recipe.save(staging / "recipe.yaml")
        model = staging / "model"
        if mergekit_text is not None:
            (staging / "mergekit.yaml").write_text(mergekit_text)
            merge_to_disk(recipe, model, device=device)  # with a card that has no scores
            section = None
        else:
            fallback = export_path_model(recipe, model, dfs_format)
            written = "path" if dfs_format == "path" or fallback is not None else "unrolled"
            section = path_format_section(model, written, fallback)
        if scores is not None or section is not None:
            card = model_card(recipe, scores.metrics, scores.caption, scores.paired) if scores else model_card(recipe)
            (model / "README.md").write_text(card + (section or ""))
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for note in notes:
        warnings.warn(f"mergekit.yaml is not exact: {note}", ExportWarning, stacklevel=2)
    if fallback is not None:
        warnings.warn(f"the layer path is written in evomerge's path format, which only evomerge runs right: "
                      f"{fallback}", ExportWarning, stacklevel=2)
    return out


def path_format_section(model: Path, written: str, fallback: str | None) -> str:
    """The model card's word on how a DFS model is stored, since a plain loader runs only one of the formats right."""
    architecture = json.loads((model / "config.json").read_text())["architectures"][0]
    if written == "unrolled":
        return (f"\n## Format\n\nUnrolled: a plain `{architecture}` checkpoint whose layer k is hop k of the path "
                "(a block used twice is stored twice), the hops' input scales folded into each layer's `o_proj` and "
                "`down_proj`. transformers, vLLM and other loaders run it as it is, without evomerge.\n")
    why = f" (not unrolled: {fallback})" if fallback is not None else ""
    return (f"\n## Format\n\nevomerge's layer-path format{why}: each used block stored once as a `{architecture}` "
            f"layer, plus `evomerge_path.json` with the hops and their input scales. Load it with "
            "`evomerge.modelio.load_model`: other loaders (transformers, vLLM) would run each stored block once, in "
            "storage order, unscaled.\n")


def export_path_model(recipe: DFSRecipe, out: Path, dfs_format: str = "unrolled") -> str | None:
    """The recipe's path model over its sources, plus the owner's tokenizer, in the owner checkpoint's dtype (as
    a merged model keeps its reference's), else float32: unrolled into a plain checkpoint (``"unrolled"``) or in
    evomerge's path format (``"path"``).  Returns why an unrolled export fell back to the path format (folding
    the scales would not be exact), else None."""
    stored = CheckpointLayout.read(recipe.models[recipe.embed_from]).float_dtypes
    dtype = stored[0] if len(stored) == 1 and stored[0] in DTYPES else "float32"
    sources = [load_model(path, dtype=dtype) for path in recipe.models]
    path_model = recipe_path_model(recipe, sources)
    fallback = unroll_obstacle(path_model) if dfs_format == "unrolled" else None
    if dfs_format == "unrolled" and fallback is None:
        unroll_path_model(path_model).save_pretrained(out, safe_serialization=True)
    else:
        save_path_model(path_model, out, {"recipe": recipe.to_dict()})
    load_tokenizer(recipe.models[recipe.embed_from]).save_pretrained(out)
    return fallback


def export_command(cfg: DictConfig) -> Path:
    """`evomerge export run=<run dir> out=<dir>` or `evomerge export recipe=<file> out=<dir>` [overwrite=true]
    [dfs_format=path]."""
    run, recipe, out = (OmegaConf.select(cfg, key) for key in ("run", "recipe", "out"))
    if bool(run) == bool(recipe):
        raise ExportError("export needs exactly one of run=<search run directory> or recipe=<recipe.yaml>")
    if not out:
        raise ExportError("export needs out=<directory>")
    if run and not Path(run).is_dir():
        raise ExportError(f"run={run}: no such directory")
    if recipe and not Path(recipe).is_file():
        raise ExportError(f"recipe={recipe}: no such file")
    device = OmegaConf.select(cfg, "device", default=None) or "cpu"
    check_placement(device, OmegaConf.select(cfg, "dtype", default=None) or "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        written = export(run or recipe, out, overwrite=bool(OmegaConf.select(cfg, "overwrite", default=False)),
                         device=device, dfs_format=OmegaConf.select(cfg, "dfs_format", default=None) or "unrolled")
    for warning in caught:
        if issubclass(warning.category, ExportWarning):
            print(f"evomerge export: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    print(f"exported {written}: {', '.join(sorted(p.name + ('/' if p.is_dir() else '') for p in written.iterdir()))}")
    return written
