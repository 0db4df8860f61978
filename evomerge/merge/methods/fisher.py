"""Fisher-weighted averaging (Matena & Raffel 2022, arXiv:2111.09832): sum_i w_i F_i theta_i / sum_i w_i F_i with
diagonal Fishers F_i estimated on the task's prompts (`evomerge.merge.statistics`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import as_scalar, as_vector, flat, output, run_kernel
from evomerge.merge.methods.linear import linear, zero_sum_notes
from evomerge.merge.methods.registry import WEIGHT, Inputs, merge_method, Mergekit, PerModel


def _fisher_kernel(
    out: Tensor, tensors: list[Tensor], fishers: list[Tensor], weights: Tensor, floor: Tensor
) -> Tensor:
    numerator = torch.zeros_like(tensors[0], dtype=torch.float32)
    denominator = torch.zeros_like(numerator)
    for index, tensor in enumerate(tensors):
        importance = torch.clamp_min(fishers[index].float(), floor) * weights[index]
        numerator = numerator + importance * tensor.float()
        denominator = denominator + importance
    out.copy_(numerator / denominator)
    return out



def fisher(
    tensors: Sequence[Tensor],
    fishers: Sequence[Tensor],
    weights: Sequence[float],
    *,
    floor: float = 1e-6,
    out: Tensor | None = None,
) -> Tensor:
    """Fisher-weighted average sum(w_i F_i theta_i) / sum(w_i F_i) with diagonal Fishers F_i floored at
    ``floor`` so entries no prompt touched fall back to the weighted average.  Fishers on another device
    are copied to the tensors' one."""
    out = output(out, tensors[0])
    run_kernel(
        _fisher_kernel,
        out.numel(),
        flat(out),
        [flat(tensor) for tensor in tensors],
        [flat(values.to(out.device)) for values in fishers],
        as_vector(weights, out.device),
        as_scalar(floor, out.device),
    )
    return out



def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"normalize": True}


def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    return [f"mergekit has no {recipe.method} merge; this is the normalized weighted average that evomerge uses for "
            "tensors without statistics, not the statistics-weighted merge", *zero_sum_notes(recipe)]


@merge_method("fisher", base="none", statistics="fisher", mergekit=Mergekit(None, _options, _notes),
              paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv:2111.09832)")
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, fisher_floor: Annotated[float, Field(gt=0)] = 1e-6,
          prompts: str | None = None, max_prompts: Annotated[int, Field(ge=1)] = 64,
          statistics_dir: str | None = None) -> Tensor:
    if inputs.statistics is None:  # no prompt reached this tensor
        return linear(inputs.tensors, weight, normalize=True, out=inputs.out)
    return fisher(inputs.tensors, inputs.statistics, weight, floor=fisher_floor, out=inputs.out)
