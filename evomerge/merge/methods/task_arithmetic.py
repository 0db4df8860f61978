"""Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): base + lambda * sum_i w_i (theta_i - base)."""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.merge.methods.kernels import (
    as_scalar,
    as_vector,
    flat,
    output,
    run_kernel,
    task_sum_kernel,
    weight_divisor,
)
from evomerge.merge.methods.registry import (
    WEIGHT,
    Finite,
    Inputs,
    Mergekit,
    PerModel,
    merge_method,
)
from torch import Tensor


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    normalize: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """base + scale * sum(w_i * (theta_i - base)), the sum divided by sum(w_i) when ``normalize``."""
    out = output(out, base)
    run_kernel(
        task_sum_kernel,
        out.numel(),
        flat(out),
        flat(base),
        [flat(tensor) for tensor in tensors],
        as_vector(weights, out.device),
        weight_divisor(weights, normalize, out.device),
        as_scalar(scale, out.device),
    )
    return out


@merge_method("task_arithmetic", paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
              mergekit=Mergekit("task_arithmetic"))
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, lambda_: Finite = 1.0, normalize: bool = False) -> Tensor:
    return task_arithmetic(inputs.base, inputs.tensors, weight, scale=lambda_, normalize=normalize, out=inputs.out)
