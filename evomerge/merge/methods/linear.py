"""Linear merge (Wortsman et al. 2022, "Model soups", arXiv:2203.05482): sum_i w_i theta_i / sum_i w_i."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.merge.methods.kernels import (
    as_vector,
    flat,
    output,
    run_kernel,
    weight_divisor,
    weighted_sum_kernel,
)
from evomerge.merge.methods.registry import (
    WEIGHT,
    Inputs,
    Mergekit,
    PerModel,
    merge_method,
)
from torch import Tensor


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Weighted average sum(w_i * theta_i) / sum(w_i); without ``normalize`` the plain weighted sum."""
    out = output(out, tensors[0])
    run_kernel(
        weighted_sum_kernel,
        out.numel(),
        flat(out),
        [flat(tensor) for tensor in tensors],
        as_vector(weights, out.device),
        weight_divisor(weights, normalize, out.device),
    )
    return out


def zero_sum_notes(recipe: Any, half: Sequence[str] = ()) -> list[str]:
    """Where a normalized weighted average's weights sum to ~0, the tools part ways (for exports as ``linear``)."""
    if not recipe.parameters.get("normalize", True):
        return []
    return [f"group {group.name!r}: weights sum to ~0; evomerge then leaves the sum unnormalized, mergekit divides "
            "by it" for group in recipe.groups if abs(sum(group["weight"])) < 1e-8]


@merge_method("linear", base="none", paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
              mergekit=Mergekit("linear", notes=zero_sum_notes))
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, normalize: bool = True) -> Tensor:
    return linear(inputs.tensors, weight, normalize=normalize, out=inputs.out)
