"""DARE (Yu et al. 2024, arXiv:2311.03099): drop each task-vector entry with probability 1 - density and rescale
the survivors, then merge the task vectors by a weighted sum (`dare_linear`) or TIES's sign consensus (`dare_ties`).

The drops are counter-based draws keyed by (seed, tensor name, model), so a recipe gives the same mask in any
process and on either merge path; mergekit draws them with torch.bernoulli (the same in distribution)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import (
    L1_EPS,
    as_scalar,
    as_vector,
    combine,
    flat,
    hash_draws,
    output,
    run_kernel,
    weight_divisor,
)
from evomerge.merge.methods.registry import DENSITY, WEIGHT, Finite, Inputs, merge_method, Mergekit, PerModel
from evomerge.merge.methods.sparsify import dare_key


def _dare_kernel(
    out: Tensor,
    base: Tensor,
    tensors: list[Tensor],
    keys: Tensor,
    weights: Tensor,
    densities: Tensor,
    rescales: Tensor,
    divisor: Tensor,
    scale: Tensor,
    consensus: bool,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        kept = torch.where(hash_draws(base.numel(), keys[index]) < densities[index], delta * rescales[index], 0.0)
        weighted.append(kept * weights[index])
    out.copy_(base32 + combine(weighted, weights, divisor, consensus, normalize) * scale)
    return out


def _dare_l1_kernel(base: Tensor, tensor: Tensor, key: Tensor, density: Tensor) -> Tensor:
    magnitudes = (tensor.float() - base.float()).abs()
    kept = torch.where(hash_draws(base.numel(), key) < density, magnitudes, 0.0)
    return torch.stack([magnitudes.sum(dtype=torch.float64), kept.sum(dtype=torch.float64)])



def _dare_rescales(
    base: Tensor, tensors: Sequence[Tensor], keys: Tensor, densities: Sequence[float], rescale: str
) -> list[float]:
    """Survivor scale per model: 1/density (DARE paper) or, for ``l1``, the ratio restoring the L1 norm."""
    if rescale == "dare":
        return [1.0 / density for density in densities]
    factors = []
    for index, (tensor, density) in enumerate(zip(tensors, densities)):
        before, after = run_kernel(
            _dare_l1_kernel, base.numel(), flat(base), flat(tensor), keys[index], as_scalar(density, base.device)
        ).tolist()
        factors.append(before / after if before >= L1_EPS and after >= L1_EPS else 1.0)
    return factors


def dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[tuple[int, int]],
    *,
    consensus: bool,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: str = "dare",
    out: Tensor | None = None,
) -> Tensor:
    """DARE: drop each delta entry with probability 1 - density (kept when its draw from `dare_draws` with that
    model's key is below density) and rescale the survivors (``rescale``: "dare" 1/density, "l1" the L1-norm
    match); then, with ``consensus`` (dare_ties), TIES sign election and disjoint merge, else (dare_linear) a
    weighted sum of the task vectors, divided by the weights' sum with ``normalize``; times ``scale``."""
    out = output(out, base)
    key_table = torch.tensor(list(keys), dtype=torch.int64, device=base.device)
    run_kernel(
        _dare_kernel,
        out.numel(),
        flat(out),
        flat(base),
        [flat(tensor) for tensor in tensors],
        key_table,
        as_vector(weights, out.device),
        as_vector(densities, out.device),
        as_vector(_dare_rescales(base, tensors, key_table, densities, rescale), out.device),
        weight_divisor(weights, normalize, out.device),
        as_scalar(scale, out.device),
        consensus,
        normalize,
    )
    return out



def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    # mergekit's only rescale matches the L1 norm (evomerge's "l1"); its masks have no seed
    return {"lambda": options["lambda"], "normalize": options["normalize"], "rescale": True}


def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    notes = ["DARE drop masks differ: evomerge draws them from a hash of (seed, tensor, model), mergekit from "
             "torch.bernoulli, so the two models agree only in distribution"]
    if recipe.parameters["rescale"] == "dare":
        notes.append("evomerge rescales kept entries by 1/density; mergekit's rescale matches each task vector's L1 "
                     "norm instead (the same in expectation)")
    return notes


def _dare_merge(consensus: bool):
    def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, density: PerModel = DENSITY, lambda_: Finite = 1.0,
              normalize: bool = False, rescale: Literal["dare", "l1"] = "dare",
              seed: Annotated[int, Field(ge=0)] = 0) -> Tensor:
        keys = [dare_key(seed, inputs.name, index) for index in range(len(inputs.tensors))]
        return dare(inputs.base, inputs.tensors, weight, density, keys, consensus=consensus, scale=lambda_,
                     normalize=normalize, rescale=rescale, out=inputs.out)
    return merge


PAPER = "Yu et al. 2024, Language models are Super Mario (arXiv:2311.03099)"
merge_method("dare_ties", paper=PAPER, mergekit=Mergekit("dare_ties", _options, _notes))(_dare_merge(consensus=True))
merge_method("dare_linear", paper=PAPER, mergekit=Mergekit("dare_linear", _options, _notes))(_dare_merge(consensus=False))
