"""Layer-path models: a DFS recipe run over the pool's resident decoder blocks, by reference.

A path model is the embedding owner's own HF class (e.g. `MistralForCausalLM`) built on the meta device with
one decoder layer per hop, whose layers are `HopLayer`s pointing at blocks of the resident source models and
whose embeddings, final norm, rotary table and head are the owner's modules. No weight is copied, so a whole
population of candidates costs no memory beyond the pool, and HF `generate` (hence the evaluator's batched
generator) works on it unchanged. Each hop has its own slot in the KV cache -- a block that runs twice keeps
two caches -- because `HopCache` renames the block's own layer index to the hop index.

A path model is saved as an ordinary HF checkpoint holding each used block once (as layers 0..K-1 of the
owner's architecture) plus `evomerge_path.json` with the hops; `load_path_model` rebuilds the path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from evomerge.merge import MergeError
from evomerge.recipe import DFSRecipe, Hop

PATH_FILE = "evomerge_path.json"
PATH_FORMAT = "evomerge-path"
PATH_VERSION = 1
# Config fields that must agree for blocks of different models to be chained on one residual stream.
SHAPE_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rope_parameters", "rope_theta", "rms_norm_eps", "hidden_act")


class PathModelError(MergeError):
    """A layer path cannot be built over these models."""


class HopCache:
    """The shared KV cache as one hop sees it: the block's `update(..., layer_idx)` lands in the hop's slot."""

    def __init__(self, cache: Any, hop: int):
        self._cache = cache
        self._hop = hop

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self._cache.update(key_states, value_states, self._hop, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class HopLayer(nn.Module):
    """One hop: scale the residual stream, then run a borrowed decoder block with the hop's cache slot."""

    def __init__(self, block: nn.Module, hop: int, scale: float):
        super().__init__()
        self.block = block
        self.hop = hop
        self.scale = float(scale)
        if hasattr(block, "attention_type"):  # models with mixed attention pick the mask per layer
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values: Any = None, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        cache = HopCache(past_key_values, self.hop) if past_key_values is not None else None
        return self.block(hidden_states, *args, past_key_values=cache, **kwargs)


def _decoder(model: PreTrainedModel) -> nn.Module:
    body = model.base_model
    if not all(hasattr(body, name) for name in ("layers", "embed_tokens", "norm")):
        raise PathModelError(
            f"layer paths need a Llama-style decoder (model.layers, embed_tokens, norm); "
            f"{type(model).__name__} is not one"
        )
    return body


def check_compatible(models: Sequence[PreTrainedModel]) -> None:
    """Blocks of different models can share one residual stream only if these shapes agree."""
    first = models[0].config
    for index, model in enumerate(models[1:], start=1):
        for name in SHAPE_FIELDS:
            a, b = getattr(first, name, None), getattr(model.config, name, None)
            if a != b:
                raise PathModelError(f"pool models 0 and {index} differ in {name} ({a!r} vs {b!r}): their layers "
                                     "cannot be chained in one path")


def build_path_model(hops: Sequence[Hop], sources: Sequence[PreTrainedModel], embed_from: int = 0) -> PreTrainedModel:
    """A model running `hops` over the blocks of `sources` (resident, shared), with `sources[embed_from]`'s
    embeddings, final norm and head."""
    if not hops:
        raise PathModelError("the layer path is empty: no slot is included")
    check_compatible(sources)
    owner = sources[embed_from]
    owner_body = _decoder(owner)
    blocks = []
    for index, hop in enumerate(hops):
        layers = _decoder(sources[hop.model]).layers
        if not 0 <= hop.layer < len(layers):
            raise PathModelError(f"hop {index} asks for block {hop.layer} of model {hop.model}, which has {len(layers)}")
        blocks.append(layers[hop.layer])
    config = copy.deepcopy(owner.config)
    config.num_hidden_layers = len(hops)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [sources[hop.model].config.layer_types[hop.layer] for hop in hops]
    with torch.device("meta"):
        shell = type(owner)(config)
    body = shell.base_model
    body.embed_tokens = owner_body.embed_tokens
    body.norm = owner_body.norm
    if hasattr(owner_body, "rotary_emb"):
        body.rotary_emb = owner_body.rotary_emb
    body.layers = nn.ModuleList(HopLayer(block, index, hop.scale) for index, (hop, block) in enumerate(zip(hops, blocks)))
    shell.set_output_embeddings(owner.get_output_embeddings())
    left = [name for name, tensor in [*shell.named_parameters(), *shell.named_buffers()] if tensor.is_meta]
    if left:
        raise PathModelError(f"{type(owner).__name__} has modules a layer path does not borrow: {left[:3]}")
    shell.generation_config = copy.deepcopy(owner.generation_config)
    return shell.eval()


def recipe_path_model(recipe: DFSRecipe, sources: Sequence[PreTrainedModel]) -> PreTrainedModel:
    for model, path, count in zip(sources, recipe.models, recipe.layers):
        if model.config.num_hidden_layers != count:
            raise PathModelError(f"the recipe gives {path} {count} blocks; the model has {model.config.num_hidden_layers}")
    return build_path_model(recipe.path, sources, recipe.embed_from)


def unique_parameters(model: nn.Module) -> int:
    """Parameters a model holds, each shared tensor counted once (a block on the path twice costs once)."""
    return sum(parameter.numel() for parameter in model.parameters())  # parameters() yields each object once


def path_length(model: nn.Module) -> int:
    return len(model.base_model.layers)


def save_path_model(model: PreTrainedModel, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Each used block once, as the layers of an ordinary checkpoint, plus the hops that walk them."""
    out = Path(out)
    hops = list(model.base_model.layers)
    unique: dict[int, int] = {}  # id(block) -> stored layer index
    for hop in hops:
        unique.setdefault(id(hop.block), len(unique))
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(unique)
    if getattr(config, "layer_types", None) is not None:
        first_types = {}
        for hop, layer_type in zip(hops, config.layer_types):
            first_types.setdefault(unique[id(hop.block)], layer_type)
        config.layer_types = [first_types[index] for index in range(len(unique))]
    with torch.device("meta"):
        stored = type(model)(config)
    stored.base_model.layers = nn.ModuleList(
        next(hop.block for hop in hops if unique[id(hop.block)] == index) for index in range(len(unique))
    )
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if hasattr(model.base_model, name):
            setattr(stored.base_model, name, getattr(model.base_model, name))
    stored.set_output_embeddings(model.get_output_embeddings())
    stored.generation_config = model.generation_config
    stored.save_pretrained(out, safe_serialization=True)
    document = {"format": PATH_FORMAT, "version": PATH_VERSION,
                "hops": [[unique[id(hop.block)], hop.scale] for hop in hops], **(extra or {})}
    (out / PATH_FILE).write_text(json.dumps(document, indent=1))
    return out


def is_path_model_dir(path: str | Path) -> bool:
    return (Path(path) / PATH_FILE).is_file()


def load_path_model(path: str | Path, stored: PreTrainedModel) -> PreTrainedModel:
    """The path model of a directory written by `save_path_model`, over `stored` (its checkpoint, loaded)."""
    document = json.loads((Path(path) / PATH_FILE).read_text())
    if document.get("format") != PATH_FORMAT or document.get("version") != PATH_VERSION:
        raise PathModelError(f"{path}/{PATH_FILE} is not an evomerge path file of version {PATH_VERSION}")
    hops = [Hop(0, int(layer), float(scale)) for layer, scale in document["hops"]]
    return build_path_model(hops, [stored])
