"""`evomerge eval model=<dir> task=<name> split=test out=<file.json>`: score one model on one task split.

The JSON report holds the metrics and every sample (prompt, generation, extracted answer, gold, Japanese
probability); for `task=lm_eval`, lm-eval's per-row answers and metrics. Keys read from the config: model,
task (the `task` group entry or a bare name), split, out, batch_size / max_padding / max_decode_padding /
max_batch_tokens / max_new_tokens (also inside the task entry), dtype, device, cache (a JSON result-cache
file), progress, and task variables: zoo_dir (else derived from `zoo` + `home`), mgsm_dir.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import TaskError
from evomerge.eval.configured import configured_task, task_evaluator
from evomerge.eval.evaluator import ResultCache, generation_options
from evomerge.eval.task import CONFIG_VARIABLES
from evomerge.merge.memory import InMemoryMerger
from evomerge.modelio import load_model, load_tokenizer
from evomerge.pool import check_placement
from evomerge.pathmodel import recipe_path_model
from evomerge.recipe import PSRecipe, load_recipe

TASK_VARIABLES = ("zoo_dir", *CONFIG_VARIABLES)


def eval_command(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, write the JSON report to `out` (default: <hydra output dir or cwd>/eval_report.json), return it."""
    recipe_path, model_path = cfg.get("recipe"), cfg.get("model")
    if (recipe_path is None) == (model_path is None):
        raise TaskError("evomerge eval needs one of model=<model directory or hub id> or recipe=<recipe.yaml>")
    dtype, device = cfg.get("dtype") or "float32", cfg.get("device") or "cpu"
    check_placement(device, dtype)  # a device this machine lacks: one line, before any model is read
    entry = _task_entry(cfg)
    split = cfg.get("split") or "test"
    task = configured_task(entry, _task_variables(cfg))

    if recipe_path is not None:  # merged in memory, never written to disk
        recipe = load_recipe(recipe_path)
        if isinstance(recipe, PSRecipe):
            model_path = recipe.base or recipe.models[0]
            merger = InMemoryMerger(recipe.base, recipe.models, device=device, dtype=dtype)
            model = merger.merge(recipe)
        else:  # a layer path over its source models
            model_path = recipe.models[recipe.embed_from]
            model = recipe_path_model(recipe, [load_model(path, dtype, device) for path in recipe.models])
    else:
        model = load_model(model_path, dtype, device)
    tokenizer = load_tokenizer(model_path)
    evaluator = task_evaluator(
        task,
        split,
        tokenizer,
        generation_options(cfg, entry),  # a top-level override wins over the task entry's value
        cache=ResultCache(cfg.get("cache")) if cfg.get("cache") else None,
        progress=bool(cfg.get("progress", True)),
    )
    key = f"recipe:{recipe.hash}|{dtype}" if recipe_path is not None else f"{model_key(model_path)}|{dtype}"
    result = evaluator.evaluate(model, model_key=key)
    source = {"recipe": str(recipe_path), "recipe_hash": recipe.hash} if recipe_path is not None else {"model": str(model_path)}
    report = {**source, **result.to_dict()}
    out = Path(cfg.get("out") or _default_output_dir() / "eval_report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
    print(f"{task.name} [{split}] {recipe_path or model_path}: {summary}\nreport: {out}")
    return report


def model_key(model_path: str | Path) -> str:
    """A cache key for a model directory: its path and its weight files' names, sizes and mtimes (no hashing
    of gigabytes); a hub id is its own key."""
    path = Path(model_path)
    if not path.is_dir():
        return f"hub:{model_path}"
    weights = sorted(path.glob("*.safetensors"))
    signature = json.dumps([(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights])
    return f"dir:{path.resolve()}:{hashlib.sha256(signature.encode()).hexdigest()[:12]}"


def _task_entry(cfg: DictConfig) -> dict[str, Any]:
    """`task` is either the Hydra group entry (a mapping with `name` and per-run options) or a bare name."""
    entry = cfg.get("task")
    if entry is None:
        raise TaskError("evomerge eval needs task=<name>")
    if isinstance(entry, str):
        return {"name": entry}
    options = OmegaConf.to_container(entry, resolve=True)
    if "name" not in options:
        raise TaskError(f"the task config {options} has no 'name'")
    return options


def _task_variables(cfg: DictConfig) -> dict[str, str]:
    variables = {name: str(cfg.get(name)) for name in TASK_VARIABLES if cfg.get(name) is not None}
    if "zoo_dir" not in variables and cfg.get("zoo") is not None and cfg.get("home") is not None:
        from evomerge.zoo.build import ZooSpec, zoo_dir  # the zoo's own naming rule: <home>/zoo-<variant>-<hash>

        spec = ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True))
        variables["zoo_dir"] = str(zoo_dir(spec, cfg.home))
    return variables


def _default_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
