"""Layer-path models: a DFS recipe run over the pool's resident decoder blocks, by reference.

A path model is an ordinary model of the embedding owner's HF class (e.g. `MistralForCausalLM`) with one decoder
layer per hop: layer k *is* hop k -- built by the class itself with `layer_idx = k` and the hop's layer type --
but its parameters are the source block's own `Parameter` objects, attached by reference, and the hop's input
scale is a forward pre-hook. No weight is copied, so a whole population of candidates costs no memory beyond the
pool; and since nothing stands between transformers and its layers, its own KV cache, masks and layer indexing
line up on every version (a block that runs twice is two layers, with two cache slots). HF `generate`, hence the
evaluator's batched generator, runs on it unchanged.

A path model is saved in one of two forms. `unroll_path_model` makes it a plain model of the owner's
architecture -- one stored layer per hop, the input scales folded into the weights -- that transformers or vLLM
load with no evomerge code; it exists where the folding is exact (see there). `save_path_model` stores each used
block once (as layers 0..K-1 of the owner's architecture) plus `evomerge_path.json` with the hops, which only
`load_path_model` (hence `evomerge.modelio.load_model`) runs right: any other loader would run each stored block
once, in storage order, unscaled.
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

from evomerge.errors import PathModelError
from evomerge.recipe import DFSRecipe, Hop

PATH_FILE = "evomerge_path.json"
PATH_FORMAT = "evomerge-path"
PATH_VERSION = 1
# Config fields that must agree for blocks of different models to be chained on one residual stream.
SHAPE_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rope_parameters", "rope_theta", "rms_norm_eps", "hidden_act")
# Model types whose decoder layer is `h = x + attn(rmsnorm(x)); h + mlp(rmsnorm(h))` and whose model neither
# scales the embeddings nor normalises a branch's output (checked in transformers' modeling code): input
# scales fold into their weights. Gemma, for one, normalises branch outputs and scales its embeddings.
FOLDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BRANCH_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")  # the last linear map of each residual branch


def _borrow(layer: nn.Module, block: nn.Module) -> None:
    """Point every parameter and buffer of `layer` at `block`'s own tensors (same objects: no copy)."""
    layer_modules = dict(layer.named_modules())
    for name, module in block.named_modules():
        target = layer_modules.get(name)
        if type(target) is not type(module):
            raise PathModelError(f"block module {name or '<root>'} ({type(module).__name__}) has no counterpart "
                                 f"in the owner's layer ({type(target).__name__})")
        target._parameters.update(module._parameters)
        target._buffers.update(module._buffers)


def _scale_input(scale: float):
    """A forward pre-hook multiplying a decoder layer's input stream by `scale` (positional or keyword)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


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


def _shell(owner: PreTrainedModel, layer_types: Sequence[str] | None, layers: int) -> PreTrainedModel:
    """The owner's class with `layers` decoder layers on the meta device, its embeddings, norm and head borrowed."""
    config = copy.deepcopy(owner.config)
    config.num_hidden_layers = layers
    if layer_types is not None:
        config.layer_types = list(layer_types)
    with torch.device("meta"):
        shell = type(owner)(config)
    body, owner_body = shell.base_model, _decoder(owner)
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if hasattr(owner_body, name):
            setattr(body, name, getattr(owner_body, name))
    shell.set_output_embeddings(owner.get_output_embeddings())
    shell.generation_config = copy.deepcopy(owner.generation_config)
    return shell


def _check_nothing_left_on_meta(model: PreTrainedModel) -> None:
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise PathModelError(f"{type(model).__name__} has modules a layer path does not borrow: {left[:3]}")


def build_path_model(hops: Sequence[Hop], sources: Sequence[PreTrainedModel], embed_from: int = 0) -> PreTrainedModel:
    """A model running `hops` over the blocks of `sources` (resident, shared), with `sources[embed_from]`'s
    embeddings, final norm and head. Layer k is hop k; `layer.path_hop` says which block and scale it runs."""
    if not hops:
        raise PathModelError("the layer path is empty: no slot is included")
    check_compatible(sources)
    blocks = []
    for index, hop in enumerate(hops):
        layers = _decoder(sources[hop.model]).layers
        if not 0 <= hop.layer < len(layers):
            raise PathModelError(f"hop {index} asks for block {hop.layer} of model {hop.model}, which has {len(layers)}")
        blocks.append(layers[hop.layer])
    owner = sources[embed_from]
    layer_types = None
    if getattr(owner.config, "layer_types", None) is not None:
        layer_types = [sources[hop.model].config.layer_types[hop.layer] for hop in hops]
    shell = _shell(owner, layer_types, len(hops))
    for layer, hop, block in zip(shell.base_model.layers, hops, blocks):
        _borrow(layer, block)
        layer.path_hop = hop
        if hop.scale != 1.0:
            layer.register_forward_pre_hook(_scale_input(float(hop.scale)), with_kwargs=True)
    _check_nothing_left_on_meta(shell)
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
    stored_index: dict[tuple[int, int], int] = {}  # (source model, block) -> stored layer index
    first_hop: list[nn.Module] = []
    for layer in hops:
        key = (layer.path_hop.model, layer.path_hop.layer)
        if key not in stored_index:
            stored_index[key] = len(first_hop)
            first_hop.append(layer)
    layer_types = None
    if getattr(model.config, "layer_types", None) is not None:
        layer_types = [model.config.layer_types[hops.index(layer)] for layer in first_hop]
    stored = _shell(model, layer_types, len(first_hop))
    for target, layer in zip(stored.base_model.layers, first_hop):
        _borrow(target, layer)
    _check_nothing_left_on_meta(stored)
    stored.save_pretrained(out, safe_serialization=True)
    document = {"format": PATH_FORMAT, "version": PATH_VERSION,
                "hops": [[stored_index[layer.path_hop.model, layer.path_hop.layer], layer.path_hop.scale]
                         for layer in hops], **(extra or {})}
    (out / PATH_FILE).write_text(json.dumps(document, indent=1))
    return out


def unroll_obstacle(model: PreTrainedModel) -> str | None:
    """Why `unroll_path_model` cannot make `model` (a path model) a plain model computing the same function;
    None when it can. Unscaled paths always unroll (the blocks are copied as they are)."""
    layers = model.base_model.layers
    scales = [float(layer.path_hop.scale) for layer in layers]
    if all(scale == 1.0 for scale in scales):
        return None
    model_type = model.config.model_type
    if model_type not in FOLDABLE_MODEL_TYPES:
        return (f"{model_type} is not one of the pre-norm RMSNorm architectures {list(FOLDABLE_MODEL_TYPES)} whose "
                "input scales fold into the weights")
    for index, scale in enumerate(scales):
        if scale <= 0:
            return f"hop {index} scales its input by {scale:g}; only positive scales pass through RMSNorm unchanged"
    for index, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        for name in BRANCH_OUTPUTS:
            if not isinstance(modules.get(name), nn.Linear):
                return f"hop {index} has no linear {name} to fold its scale into"
    return None


def unroll_path_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain model of the owner's class and full config (only `num_hidden_layers` and `layer_types` per hop
    changed) whose layer k holds hop k's block -- a block used twice is held twice -- with the input scales
    folded into the weights, so it needs no hook and loads with transformers alone. Shares the embeddings, final
    norm, head and the blocks that need no copy with `model`; save it with `save_pretrained`.

    The folding. Hop k turns its input stream h into s_k*h and adds the outputs of its two branches,
    A(x) = o_proj(attn(rmsnorm(x))) and M(x) = down_proj(mlp(rmsnorm(x))). RMSNorm ignores a positive factor c of
    its input: rmsnorm(c*x) = rmsnorm(x) (exactly when eps = 0). So with P_k = s_1*...*s_k, the stream kept in
    units of P_k, g_k = h_k / P_k, obeys g_k = g + A(g)/P_k + M(g + A(g)/P_k)/P_k with g = g_{k-1}: an
    unscaled layer whose o_proj and down_proj (weights and biases) are divided by P_k. g_0 = h_0, so the
    embeddings stay; the final norm sees g_K = h_K / P_K, which it ignores, so it and the head stay too.
    Exact for every scale > 0 up to RMSNorm's eps: the folded model normalises g by sqrt(mean(g^2) + eps) where
    the path model effectively used sqrt(mean(g^2) + eps / P_k^2), a relative difference of about
    |1 - 1/P_k^2| * eps / (2 * mean(g^2)) per norm -- ~1e-6 * |1 - 1/P_k^2| for streams of unit mean square.
    The folded weights are computed in float64 and rounded once to their dtype.
    """
    obstacle = unroll_obstacle(model)
    if obstacle is not None:
        raise PathModelError(f"the layer path cannot be unrolled exactly: {obstacle}")
    layers = list(model.base_model.layers)
    plain = _shell(model, getattr(model.config, "layer_types", None), len(layers))
    held: set[int] = set()  # tensors already in `plain`: a second use of a block stores a copy
    product = 1.0  # P_k
    for target, layer in zip(plain.base_model.layers, layers):
        product *= float(layer.path_hop.scale)
        _borrow(target, layer)
        for name, module in target.named_modules():
            fold = name in BRANCH_OUTPUTS and product != 1.0
            for key, parameter in module._parameters.items():
                if parameter is None:
                    continue
                if fold:
                    data = (parameter.detach().double() / product).to(parameter.dtype)
                elif id(parameter) in held:
                    data = parameter.detach().clone()
                else:
                    held.add(id(parameter))
                    continue
                module._parameters[key] = nn.Parameter(data, requires_grad=parameter.requires_grad)
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) in held:
                    module._buffers[key] = buffer.clone()
                elif buffer is not None:
                    held.add(id(buffer))
    _check_nothing_left_on_meta(plain)
    return plain.eval()


def is_path_model_dir(path: str | Path) -> bool:
    return (Path(path) / PATH_FILE).is_file()


def load_path_model(path: str | Path, stored: PreTrainedModel) -> PreTrainedModel:
    """The path model of a directory written by `save_path_model`, over `stored` (its checkpoint, loaded)."""
    document = json.loads((Path(path) / PATH_FILE).read_text())
    if document.get("format") != PATH_FORMAT or document.get("version") != PATH_VERSION:
        raise PathModelError(f"{path}/{PATH_FILE} is not an evomerge path file of version {PATH_VERSION}")
    hops = [Hop(0, int(layer), float(scale)) for layer, scale in document["hops"]]
    return build_path_model(hops, [stored])
