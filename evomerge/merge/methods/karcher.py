"""Karcher mean (arXiv:2603.04972, as mergekit 0.1.5's ``karcher``): the weighted Riemannian (Frechet) mean of the
models' directions on the unit hypersphere, scaled by their weighted mean norm.

With u_i = theta_i / |theta_i| over the models with |theta_i| > tol and alphas a_i = w_i / sum_j w_j (equal weights:
exactly 1/n, as mergekit's uniform alphas)::

    m <- normalize(sum_i a_i u_i)                                     (u of the first model if that is < tol long)
    repeat max_iter times:                                            (fixed-point / gradient iteration)
        g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  cos(theta_i) = clamp(m . u_i, -1, 1),
            skipping models with theta_i < tol;  stop when |g| < tol
        m <- normalize(cos(|g|) m + sin(|g|) g / |g|)
    result = (sum_i a_i |theta_i|) m

(the alphas above are renormalized over the models kept; no model kept: zeros; one model: its tensor).  mergekit
0.1.5 always uses a_i = 1/n; evomerge's per-model ``weight`` makes the alphas searchable, and the export is exact
only where a group's weights are all equal (otherwise a note says mergekit averages uniformly).  If the kept
models' weights are all 0, evomerge averages those uniformly (mergekit has no weights, so never meets this).

m stays in the span of the u_i, so evomerge runs mergekit's iteration on coefficients c (m = sum_j c_j u_j) with
every dot product and norm taken from the units' Gram matrix, accumulated in float64 `BITS_CHUNK` entries at a time
(`multislerp.gram`); the result is then one fused float32 pass, sum_j (scale c_j / |theta_j|) theta_j.  mergekit
iterates on full float32 tensors, so its tangent carries rounding noise of ~1e-7 (relative to the unit vectors):
the tools agree to float rounding except when |g| lands within that noise of ``tol`` and one tool takes one more
step than the other -- a step shorter than tol (1e-5 relative by default).

Memory (58.7M-entry tensor of a 7B model): no full-size temporaries -- the Gram pass holds n float64 chunk copies
(n x 16 MB) and the iteration works on n x n numbers.  mergekit's holds the n unit vectors, the mean, the tangent
and the temporaries of each update in float32 (n + ~4 copies of 235 MB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import output
from evomerge.merge.methods.multislerp import combine, gram
from evomerge.merge.methods.registry import Inputs, Mergekit, PerModel, Value, merge_method

KARCHER_WEIGHT = Value(1.0, search=(0.0, 1.5), low=0.0)
"""A model's share of the mean, before normalization (all equal: mergekit's uniform mean)."""


def karcher_alphas(weights: Sequence[float]) -> list[float]:
    """The weights normalized to sum 1; exactly 1/n each when all are equal (all 0 included)."""
    if len(set(weights)) == 1:
        return [1.0 / len(weights)] * len(weights)
    total = sum(weights)
    return [weight / total for weight in weights]


def _quadratic(grams: Sequence[Sequence[float]], x: Sequence[float], y: Sequence[float]) -> float:
    return sum(x[i] * y[j] * grams[i][j] for i in range(len(x)) for j in range(len(y)))


def karcher_coefficients(grams: Sequence[Sequence[float]], alphas: Sequence[float], *, max_iter: int = 10,
                         tol: float = 1e-5) -> list[float]:
    """k_i of ``result = sum_i k_i theta_i`` from the models' Gram matrix: mergekit's `karcher_merge_tensors` on the
    coefficients of the mean in the basis of the unit vectors."""
    count = len(alphas)
    norms = [math.sqrt(max(grams[i][i], 0.0)) for i in range(count)]
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    units = [[grams[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]  # Gram of the unit vectors
    kept = [alphas[i] for i in valid]
    total = sum(kept)
    shares = [alpha / total for alpha in kept] if total != 0 else [1.0 / len(valid)] * len(valid)
    size = len(valid)

    mean = list(shares)
    mean_norm = math.sqrt(max(_quadratic(units, mean, mean), 0.0))
    mean = [1.0 if j == 0 else 0.0 for j in range(size)] if mean_norm < tol else [c / mean_norm for c in mean]
    for _ in range(max_iter):
        tangent = [0.0] * size
        for i in range(size):
            cosine = min(1.0, max(-1.0, sum(mean[j] * units[j][i] for j in range(size))))
            theta = math.acos(cosine)
            if theta < tol:
                continue
            factor = shares[i] * theta / math.sin(theta)
            for j in range(size):  # factor * (u_i - cosine * m)
                tangent[j] += factor * ((1.0 if j == i else 0.0) - cosine * mean[j])
        tangent_norm = math.sqrt(max(_quadratic(units, tangent, tangent), 0.0))
        if tangent_norm < tol:
            break
        cos_step, sin_step = math.cos(tangent_norm), math.sin(tangent_norm)
        mean = [cos_step * m + sin_step * g / tangent_norm for m, g in zip(mean, tangent)]
        unit_norm = math.sqrt(max(_quadratic(units, mean, mean), 0.0))
        if unit_norm > tol:
            mean = [c / unit_norm for c in mean]

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    coefficients = [0.0] * count
    for j, index in enumerate(valid):
        coefficients[index] = scale * mean[j] / norms[index]
    return coefficients


def karcher(tensors: Sequence[Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5,
            out: Tensor | None = None) -> Tensor:
    """The weighted Karcher mean of the tensors' directions times their weighted mean norm (module docstring)."""
    if len(tensors) == 1:
        out = output(out, tensors[0])
        out.copy_(tensors[0])
        return out
    coefficients = karcher_coefficients(gram(tensors), karcher_alphas(list(weights)), max_iter=max_iter, tol=tol)
    return combine(tensors, coefficients, out=out)


def _notes(recipe: Any, half: Sequence[str] = ()) -> list[str]:
    weighted = [group.name for group in recipe.groups if len(set(group["weight"])) > 1]
    if not weighted:
        return []
    return [f"groups {weighted}: mergekit's karcher averages the models uniformly (weights 1/n); evomerge weights "
            "them by the recipe's normalized weights"]


@merge_method("karcher", base="none", n_models=(1, None),
              paper="Karcher mean merging (arXiv:2603.04972)", mergekit=Mergekit("karcher", notes=_notes, per_model=()))
def merge(inputs: Inputs, *, weight: PerModel = KARCHER_WEIGHT,
          max_iter: Annotated[int, Field(ge=0)] = 10,
          tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-5) -> Tensor:
    return karcher(inputs.tensors, weight, max_iter=max_iter, tol=tol, out=inputs.out)
