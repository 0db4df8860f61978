"""Multi-SLERP (Goddard 2025, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; as in
mergekit 0.1.5's ``multislerp``): barycentric interpolation of any number of (task-)vectors on a hypersphere.

With x_i = theta_i - base (or theta_i without a base) and weights w_i (normalized to sum 1 by default)::

    u_i = x_i / (|x_i| + eps)                   each whole tensor projected onto the unit sphere
    m   = sum_i w_i u_i / |sum_i w_i u_i|       the normalized weighted Euclidean mean: the tangent point
    result = base + (sum_i w_i |x_i|) * exp_m(sum_i w_i log-ish_m(u_i))

mergekit's tangent step maps each u_i to u_i - (u_i . m) m and maps the weighted sum back with the exponential map;
that weighted sum is sum_i w_i u_i - (sum_i w_i u_i . m) m = 0 identically (m is the direction of sum_i w_i u_i),
so the result is ``base + (sum_i w_i |x_i|) * m`` up to float rounding -- which is what evomerge computes:
``base + sum_i c_i x_i`` with c_i = (sum_j w_j |x_j|) w_i / ((|x_i| + eps) |sum_j w_j u_j|).

All norms and the norm of the mean come from the models' Gram matrix G_ij = x_i . x_j, accumulated in float64
`BITS_CHUNK` entries at a time (`gram`; more accurate than mergekit's float32 reductions, and exactly 0 where the
task vectors all vanish), then one fused float32 pass writes the result.  Where the weighted mean of the unit vectors
vanishes (|mean| < eps: every task vector zero, or weights that balance antipodal vectors) mergekit falls back to the
weighted sum sum_i w_i x_i (+ base) for two models and raises for more; evomerge falls back to the weighted sum for
any number.  Where normalize_weights is on and the weights sum to exactly 0 (mergekit: NaN), the weights are used
as they are.  One model: its tensor, as in mergekit.

Memory (a 7B model's largest block tensor, 58.7M entries): no full-size temporaries -- the Gram pass holds n chunk
copies in float64 (n x 16 MB) and the output kernel fuses every step into one pass.  mergekit's own implementation
stacks the n tensors and keeps their units and tangent vectors (>= 3n float32 copies: 3 x 235 MB per model).

This module also holds the helpers `gram` and `combine` that evomerge's nuslerp and karcher share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK, flat, output, run_kernel, scratch
from evomerge.merge.methods.registry import WEIGHT, Inputs, Mergekit, PerModel, merge_method


# --------------------------------------------------------------------------- helpers shared with nuslerp, karcher


def float64_device(device: torch.device) -> torch.device:
    """Where float64 sums run: the tensors' device, or the CPU for Apple's MPS (which has no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def gram(tensors: Sequence[Tensor], base: Tensor | None = None) -> list[list[float]]:
    """G_ij = x_i . x_j for x_i = tensor_i - base (the difference taken in float32, as mergekit does), summed in
    float64 `BITS_CHUNK` entries at a time: n chunk copies in float64, nothing full-size."""
    vectors = [flat(tensor) for tensor in tensors]
    reference = flat(base) if base is not None else None
    count, numel, device = len(vectors), vectors[0].numel(), float64_device(vectors[0].device)
    total = torch.zeros(count, count, dtype=torch.float64, device=device)
    for start in range(0, numel, BITS_CHUNK):
        stop = min(start + BITS_CHUNK, numel)
        block = scratch(count * (stop - start), device, torch.float64).view(count, stop - start)
        for index, vector in enumerate(vectors):
            piece = vector[start:stop]
            block[index].copy_(piece if reference is None else piece.float() - reference[start:stop].float())
        total += block @ block.T
    return total.tolist()


def _combine_kernel(out: Tensor, base: Tensor | None, tensors: list[Tensor], coefficients: Tensor) -> Tensor:
    base32 = None if base is None else base.float()
    total = None
    for index, tensor in enumerate(tensors):
        vector = tensor.float() if base32 is None else tensor.float() - base32
        term = vector * coefficients[index]
        total = term if total is None else total + term
    out.copy_(total if base32 is None else total + base32)
    return out


def combine(tensors: Sequence[Tensor], coefficients: Sequence[float] | Tensor, base: Tensor | None = None, *,
            out: Tensor | None = None, axis: int | None = None) -> Tensor:
    """``base + sum_i c_i (tensor_i - base)`` (without a base: ``sum_i c_i tensor_i``) in one fused float32 pass,
    written in ``out``'s dtype.  ``coefficients`` are scalars, or with ``axis`` one per vector of a 2-D view of the
    tensors (`vector_view_shape`): shape (n, vectors)."""
    like = tensors[0]
    out = output(out, like)
    shape = vector_view_shape(like, axis)
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64).to(torch.float32).to(like.device)
    if axis is None:
        coefficients = coefficients.reshape(-1, 1, 1)
    else:
        coefficients = coefficients.reshape(len(tensors), -1, 1) if axis == 1 else \
            coefficients.reshape(len(tensors), 1, -1)
    run_kernel(_combine_kernel, out.numel(), out.view(shape), None if base is None else base.reshape(shape),
               [tensor.reshape(shape) for tensor in tensors], coefficients)
    return out


def vector_view_shape(tensor: Tensor, axis: int | None) -> tuple[int, int]:
    """The 2-D view whose ``axis`` runs along the vectors: None, the whole tensor as one row; 1, rows along the
    last dimension; 0, columns along the first dimension."""
    if axis is None or tensor.dim() == 0:
        return (1, tensor.numel())
    if axis == 1:
        return (tensor.numel() // max(tensor.shape[-1], 1), tensor.shape[-1])
    return (tensor.shape[0], tensor.numel() // max(tensor.shape[0], 1))


# --------------------------------------------------------------------------- multislerp


def float32_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """mergekit's weights: float32, divided by their float32 sum when ``normalize`` and the sum is not 0."""
    values = torch.tensor(list(weights), dtype=torch.float32)
    if normalize:
        total = values.sum()
        if float(total) != 0.0:
            values = values / total
    return values.tolist()


def multislerp_coefficients(grams: Sequence[Sequence[float]], weights: Sequence[float], eps: float) -> list[float]:
    """c_i of ``result = base + sum_i c_i x_i`` from the Gram matrix of the x_i and the (normalized) weights."""
    count = len(weights)
    norms = [math.sqrt(max(grams[i][i], 0.0)) for i in range(count)]
    scaled = [weights[i] / (norms[i] + eps) if norms[i] + eps > 0 else 0.0 for i in range(count)]
    squared = sum(scaled[i] * scaled[j] * grams[i][j] for i in range(count) for j in range(count))
    mean_norm = math.sqrt(max(squared, 0.0))
    if mean_norm < eps:  # the unit vectors' weighted mean vanishes: the weighted sum (mergekit: 2 models only)
        return list(weights)
    average_norm = sum(norm * weight for norm, weight in zip(norms, weights))
    return [average_norm * value / mean_norm for value in scaled]


def multislerp(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8, out: Tensor | None = None) -> Tensor:
    """Barycentric spherical interpolation of the (task-)vectors: ``base + (sum_i w_i |x_i|) m`` with m the
    normalized weighted mean of the unit vectors x_i / (|x_i| + eps) (see the module docstring)."""
    if len(tensors) == 1:
        out = output(out, tensors[0])
        out.copy_(tensors[0])
        return out
    weights = float32_weights(weights, normalize_weights)
    coefficients = multislerp_coefficients(gram(tensors, base), weights, eps)
    return combine(tensors, coefficients, base, out=out)


def _notes(recipe: Any, half: Sequence[str] = ()) -> list[str]:
    notes = []
    if recipe.parameters["normalize_weights"]:
        zero = [group.name for group in recipe.groups if len(recipe.models) > 1
                and float(torch.tensor(list(group["weight"]), dtype=torch.float32).sum()) == 0.0]
        if zero:
            notes.append(f"groups {zero}: the weights sum to 0; mergekit divides by it (NaN), evomerge uses them "
                         "unnormalized")
    if len(recipe.models) > 2:
        notes.append("where a tensor's weighted mean of unit task vectors vanishes (e.g. no model changed it), "
                     "mergekit stops with an error for more than 2 models; evomerge takes the weighted sum")
    return notes


@merge_method("multislerp", base="optional", n_models=(1, None),
              paper="Goddard 2025, Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
              mergekit=Mergekit("multislerp", notes=_notes))
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, normalize_weights: bool = True,
          eps: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-8) -> Tensor:
    return multislerp(inputs.tensors, weight, inputs.base, normalize_weights=normalize_weights, eps=eps,
                      out=inputs.out)
