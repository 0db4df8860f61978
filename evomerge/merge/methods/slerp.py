"""Spherical linear interpolation (Shoemake 1985) between two models, t = 0 the first and t = 1 the second."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK, as_vector, flat, output, run_kernel
from evomerge.merge.methods.registry import Inputs, merge_method, Mergekit, PerGroup, Value


def _blend_kernel(out: Tensor, first: Tensor, second: Tensor, coefficients: Tensor) -> Tensor:
    out.copy_(first.float() * coefficients[0] + second.float() * coefficients[1])
    return out



def slerp(t: float, first: Tensor, second: Tensor, *, out: Tensor | None = None, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``first`` (t=0) to ``second`` (t=1) along the great circle through the
    directions of the two whole tensors; nearly (anti)parallel tensors fall back to linear interpolation.
    As in mergekit, a norm at or below ``eps`` counts as 1 (a zero tensor is taken as orthogonal to the other).
    Norms and dot product are summed in float64, `BITS_CHUNK` entries at a time (no full-size copies)."""
    a, b = flat(first), flat(second)
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), BITS_CHUNK):
        x, y = a[start:start + BITS_CHUNK].double(), b[start:start + BITS_CHUNK].double()
        sums += torch.stack([x.dot(x), y.dot(y), x.dot(y)])
    squares_a, squares_b, dot = sums.tolist()
    norm_a = math.sqrt(squares_a) if math.sqrt(squares_a) > eps else 1.0
    norm_b = math.sqrt(squares_b) if math.sqrt(squares_b) > eps else 1.0
    cosine = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(cosine) > dot_threshold:
        coefficients = (1.0 - t, t)
    else:
        angle = math.acos(cosine)
        coefficients = (math.sin((1.0 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle))
    out = output(out, first)
    run_kernel(_blend_kernel, out.numel(), flat(out), a, b, as_vector(coefficients, out.device))
    return out



@merge_method("slerp", base="none", n_models=(2, 2), paper="Shoemake 1985, Animating rotation with quaternion curves",
              mergekit=Mergekit("slerp", base_model="first"))
def merge(inputs: Inputs, *, t: PerGroup = Value(0.5, search=(0.0, 1.0), low=0.0, high=1.0)) -> Tensor:
    return slerp(t, inputs.tensors[0], inputs.tensors[1], out=inputs.out)
