"""TIES (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top-density entries, elect a sign per
entry by summed mass, and average the entries that agree: base + lambda * disjoint_mean(w_i trim(theta_i - base))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import as_scalar, as_vector, disjoint_mean, flat, output, run_kernel
from evomerge.merge.methods.registry import DENSITY, WEIGHT, Finite, Inputs, merge_method, Mergekit, PerModel
from evomerge.merge.methods.sparsify import MagnitudeTable, trim


def _ties_kernel(
    out: Tensor,
    base: Tensor,
    tensors: list[Tensor],
    weights: Tensor,
    thresholds: Tensor,
    cuts: Tensor,
    scale: Tensor,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    position = torch.arange(base.numel(), device=base.device)
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        magnitude = delta.abs()
        kept = (magnitude > thresholds[index]) | ((magnitude == thresholds[index]) & (position < cuts[index]))
        weighted.append(torch.where(kept, delta * weights[index], 0.0))
    out.copy_(base32 + disjoint_mean(weighted, weights, normalize) * scale)
    return out



def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    scale: float = 1.0,
    normalize: bool = True,
    tables: Sequence[MagnitudeTable | None] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """TIES: trim each task vector to exactly its top-``density`` entries by magnitude (`trim`), weight it,
    elect a sign per element by summed mass, and average (``normalize``: divide by the summed weights of) the
    entries that agree.  ``tables`` (one `magnitude_table` per model) only saves work: the result is the same."""
    tables = tables or [None] * len(tensors)
    trims = [trim(base, tensor, density, table) for tensor, density, table in zip(tensors, densities, tables)]
    out = output(out, base)
    run_kernel(
        _ties_kernel,
        out.numel(),
        flat(out),
        flat(base),
        [flat(tensor) for tensor in tensors],
        as_vector(weights, out.device),
        as_vector([kept.threshold for kept in trims], out.device),
        torch.tensor([kept.cut for kept in trims], dtype=torch.int64, device=out.device),
        as_scalar(scale, out.device),
        normalize,
    )
    return out



def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    if not half:
        return []
    return [f"TIES trims keep the same number of entries in both tools and the same entries above each tensor's cut, "
            f"but mergekit chooses among the entries tied at the cut with an unstable sort where evomerge keeps the "
            f"lowest indices; {half[0]} task vectors tie a lot, so the two models can differ in those tied entries "
            "(by one trimmed delta each)"]


@merge_method("ties", paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)", mergekit=Mergekit("ties", notes=_notes),
              magnitude_tables=True)
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, density: PerModel = DENSITY, lambda_: Finite = 1.0,
          normalize: bool = True) -> Tensor:
    return ties(inputs.base, inputs.tensors, weight, density, scale=lambda_, normalize=normalize,
                tables=inputs.magnitude_tables, out=inputs.out)
