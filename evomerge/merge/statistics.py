"""Per-model statistics for data-aware merges, computed once from a task's prompts and cached as safetensors.

* Fisher merging needs each parameter's diagonal (empirical) Fisher: the mean over prompts of the squared
  gradient of the language-model loss on the prompt's own tokens.
* RegMean needs, for every linear layer, the Gram matrix X^T X of the inputs it sees on the prompts
  (divided by the token count, so models seeing different numbers of tokens are comparable).

Prompts run one at a time, so no padding enters either statistic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import MergeError
from evomerge.modelio import load_model, load_tokenizer, load_tensors, save_tensors
from evomerge.recipe import PSRecipe

STATISTIC_KINDS = ("fisher", "gram")


def default_cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "statistics"


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (field ``prompt``, ``text`` or ``question``)."""
    path = Path(path)
    if not path.exists():
        raise MergeError(f"prompt file {path} does not exist")
    prompts = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            record = json.loads(line)
            field = next((key for key in ("prompt", "text", "question") if key in record), None)
            if field is None:
                raise MergeError(f"{path}:{line_number} has none of the fields prompt, text, question")
            prompts.append(str(record[field]))
        else:
            prompts.append(line)
    if not prompts:
        raise MergeError(f"prompt file {path} holds no prompts")
    return prompts[:limit]


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int,
            device: torch.device) -> dict[str, Tensor]:
    encoded = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_length)
    return {key: value.to(device) for key, value in encoded.items()}


def fisher_diagonal(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_length: int = 256
) -> dict[str, Tensor]:
    """Mean squared per-prompt gradient of the LM loss for every trainable parameter (float32, on the model's
    device)."""
    parameters = dict(model.named_parameters())
    squares = {name: torch.zeros_like(parameter, dtype=torch.float32) for name, parameter in parameters.items()}
    model.eval()
    for prompt in prompts:
        batch = _encode(tokenizer, prompt, max_length, model.device)
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                squares[name] += parameter.grad.float() ** 2
    model.zero_grad(set_to_none=True)
    return {name: total / len(prompts) for name, total in squares.items()}


def gram_matrices(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_length: int = 256
) -> dict[str, Tensor]:
    """Per linear layer ``<module>.weight``: mean over tokens of x x^T for the layer's input x (float32, on the
    model's device)."""
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def collector(name: str):
        def collect(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return collect

    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(collector(f"{module_name}.weight")))
    model.eval()
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(**_encode(tokenizer, prompt, max_length, model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: gram / counts[name] for name, gram in grams.items()}


def cached_statistics(
    kind: str,
    model_path: str | Path,
    prompts: Sequence[str],
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """``kind`` ("fisher" or "gram") statistics of one model on the CPU, loaded from the cache or computed (in
    float32 on ``device``) and cached.  Callers move them to the device they merge on.

    The cache key covers the kind, the model's resolved path and the exact prompts (not the device: the
    statistics agree across devices up to float rounding).
    """
    if kind not in STATISTIC_KINDS:
        raise MergeError(f"unknown statistic {kind!r}; expected one of {STATISTIC_KINDS}")
    model_path = Path(model_path)
    key = hashlib.sha256(json.dumps([kind, str(model_path.resolve()), list(prompts)]).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{kind}-{model_path.name}-{key}.safetensors"
    if cache_file.exists():
        return load_tensors(cache_file)
    model = load_model(model_path, dtype="float32", device=str(device))
    tokenizer = load_tokenizer(model_path)
    compute = fisher_diagonal if kind == "fisher" else gram_matrices
    values = {name: value.cpu() for name, value in compute(model, tokenizer, prompts).items()}
    del model
    save_tensors(cache_file, values)
    return values


def recipe_statistics(recipe: PSRecipe, device: str | torch.device = "cpu") -> dict[str, list[Tensor]]:
    """Tensor name -> one statistic per recipe model (on the CPU; computed on ``device`` where not cached), as
    `methods.merge_tensor` takes them."""
    kind = recipe.spec.statistics
    if kind is None:
        raise MergeError(f"{recipe.method} merging needs no statistics")
    options: Mapping = recipe.parameters
    if not options.get("prompts"):
        raise MergeError(f"{recipe.method} merging needs parameters.prompts: a text or JSONL file of task prompts")
    prompts = read_prompts(options["prompts"], options["max_prompts"])
    per_model = [cached_statistics(kind, model, prompts, options.get("statistics_dir"), device)
                 for model in recipe.models]
    shared = set(per_model[0]).intersection(*per_model[1:])
    return {name: [values[name] for values in per_model] for name in per_model[0] if name in shared}
