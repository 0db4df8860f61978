"""NuSLERP (mergekit 0.1.5's ``nuslerp``; slerp: Shoemake 1985, "Animating rotation with quaternion curves", no
arXiv id): spherical interpolation of exactly two models -- or, with a base, of their task vectors -- with
t = w_1 / (w_0 + w_1) from per-model weights (t = 0.5 when |w_0 + w_1| < 1e-6).

For vectors v_0, v_1 (the whole flattened tensors by default; with ``nuslerp_flatten: false`` each row along the
last dimension, or with ``nuslerp_row_wise: true`` each column along the first dimension, as mergekit does)::

    cos(theta) = clamp(v_0 . v_1 / (max(|v_0|, 1e-7) max(|v_1|, 1e-7)), -1, 1)
    result     = base + (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)
                 (base + (1 - t) v_0 + t v_1 where 1 - cos^2(theta) <= 1e-16: (anti)parallel vectors)

with v_i = theta_i - base when there is a base, theta_i otherwise.  Unlike evomerge's ``slerp`` it takes the
interpolation point from weights (searchable per model), interpolates task vectors when given a base, and can work
per row or per column.  Norms and dot products are summed in float64, `BITS_CHUNK` entries at a time (mergekit sums
them in float32); the coefficients then drive one fused float32 pass over the tensor.

Memory (58.7M-entry tensor of a 7B model): no full-size temporaries -- two float64 chunk copies (16 MB each) for the
sums, one float64 number per row / column for the coefficients, and the fused output kernel.  mergekit's version
holds both normalized vectors and the products (about 5 float32 copies, 1.2 GB).
"""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK
from evomerge.merge.methods.multislerp import combine, float64_device, vector_view_shape
from evomerge.merge.methods.registry import WEIGHT, Inputs, Mergekit, PerModel, merge_method

NORM_FLOOR = 1e-7  # mergekit's _normalize clamps norms at 1e-7
COLINEAR_EPS = 1e-8  # mergekit's nuslerp eps: colinear where 1 - cos^2 <= eps^2


def interpolation_point(weights: tuple[float, float] | list[float]) -> float:
    """t = w_1 / (w_0 + w_1), or 0.5 where the weights sum to ~0 (mergekit's rule)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _vector_sums(first: Tensor, second: Tensor, base: Tensor | None, axis: int | None) -> Tensor:
    """Per vector (see `vector_view_shape`): |v_0|^2, |v_1|^2 and v_0 . v_1 in float64, a (3, vectors) tensor."""
    shape = vector_view_shape(first, axis)
    a, b = first.reshape(shape), second.reshape(shape)
    c = None if base is None else base.reshape(shape)
    reduce = 0 if axis == 0 else 1
    device = float64_device(first.device)
    sums = torch.zeros(3, shape[1] if reduce == 0 else shape[0], dtype=torch.float64, device=device)
    if reduce == 1 and shape[0] == 1:  # one long vector: walk it in chunks of entries
        a, b, c = a[0], b[0], None if c is None else c[0]
        steps = [(slice(start, start + BITS_CHUNK), None) for start in range(0, shape[1], BITS_CHUNK)]
    else:  # whole rows at a time, about BITS_CHUNK entries per step
        rows = max(1, BITS_CHUNK // max(shape[1], 1))
        steps = [(slice(start, start + rows), reduce) for start in range(0, shape[0], rows)]
    for part, dim in steps:
        x, y = a[part].float(), b[part].float()
        if c is not None:
            x, y = x - c[part].float(), y - c[part].float()
        x, y = x.to(device, torch.float64), y.to(device, torch.float64)
        values = torch.stack([(x * x).sum(dim) if dim is not None else x.dot(x),
                              (y * y).sum(dim) if dim is not None else y.dot(y),
                              (x * y).sum(dim) if dim is not None else x.dot(y)])
        if dim == 1:
            sums[:, part] = values
        else:
            sums += values.reshape(3, -1)
    return sums


def nuslerp_coefficients(t: float, sums: Tensor) -> Tensor:
    """(2, vectors) float64 coefficients of v_0 and v_1 from `_vector_sums`."""
    norm_a = sums[0].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    norm_b = sums[1].clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cosine = (sums[2] / (norm_a * norm_b)).clamp(-1.0, 1.0)
    colinear = (1 - cosine.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cosine))
    sine = torch.where(colinear, 1.0, torch.sin(theta))
    first = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sine)
    second = torch.where(colinear, t, torch.sin(t * theta) / sine)
    return torch.stack([first, second])


def nuslerp(t: float, first: Tensor, second: Tensor, base: Tensor | None = None, *, flatten: bool = True,
            row_wise: bool = False, out: Tensor | None = None) -> Tensor:
    """Spherical interpolation from ``first`` (t = 0) to ``second`` (t = 1) -- of their task vectors with a
    ``base`` -- over the whole tensor (``flatten``), else per row (per column with ``row_wise``)."""
    axis = None if flatten else (0 if row_wise else 1)
    coefficients = nuslerp_coefficients(t, _vector_sums(first, second, base, axis))
    return combine([first, second], coefficients, base, out=out, axis=axis)


@merge_method("nuslerp", base="optional", n_models=(2, 2),
              paper="Shoemake 1985, Animating rotation with quaternion curves (as mergekit's nuslerp)",
              mergekit=Mergekit("nuslerp"))
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, nuslerp_flatten: bool = True,
          nuslerp_row_wise: bool = False) -> Tensor:
    return nuslerp(interpolation_point(weight), inputs.tensors[0], inputs.tensors[1], inputs.base,
                   flatten=nuslerp_flatten, row_wise=nuslerp_row_wise, out=inputs.out)
