"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the largest outliers (a gamma share) and
the smallest entries of each task vector so that a density share is kept, then merge the task vectors by a weighted
sum (`breadcrumbs`) or TIES's sign consensus (`breadcrumbs_ties`).

For task vector delta_i = theta_i - base of N entries, with density d_i < 1 and outlier share gamma_i (mergekit
0.1.5's `sparsify.magnitude_outliers`): keep = int(d_i N), top = int(gamma_i N), bottom = max(0, N - keep - top);
ranking |delta_i| ascending, the entries of rank bottom .. bottom + keep - 1 are kept -- the `keep` entries just
below the largest N - bottom - keep (when keep + top > N, fewer outliers are dropped so that keep entries remain).
Then kept_i = delta_i * m_i * s_i (s_i: with ``rescale``, the L1-norm ratio |delta_i|_1 / |delta_i m_i|_1 as
mergekit's `rescaled_masked_tensor`, else 1), and ``breadcrumbs``: base + lambda * sum_i w_i kept_i (divided by
sum_i w_i with ``normalize``); ``breadcrumbs_ties``: base + lambda * disjoint_mean(w_i kept_i).  A model with
density 1 is kept whole (gamma ignored), as in mergekit.

The selection is deterministic and matches mergekit's except among tied magnitudes at the two cuts: evomerge
ranks ties by index as a stable descending sort does (`sparsify.trim`: of equal magnitudes the lower index counts
as larger), so the kept set is the top (N - bottom) entries minus the top (N - bottom - keep), each an exact
`trim`; mergekit's ascending argsort is unstable, so which of the entries tied at a cut it keeps is arbitrary
(same count, same entries above and below the cuts).  Ties are common in half precision (see `sparsify`).

Memory: no sort.  Each cut is a `trim` (a `MagnitudeTable`: one counting pass of 2^21-entry chunks, or the table
the in-memory merger keeps), the rescale is one fused reduction per model, and the merge one fused kernel: no
temporaries of the tensor's size beyond the output when compiled (eager, for tensors under 2^16 entries, a few).
Measured on the CPU for a 16.8M-entry bf16 tensor: 116-129 MB peak RSS growth for the two trims (sparsify's
counting chunks and tie scans).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import L1_EPS, as_scalar, as_vector, combine, flat, output, run_kernel, weight_divisor
from evomerge.merge.methods.registry import DENSITY, WEIGHT, Finite, Inputs, Mergekit, PerModel, Value, merge_method
from evomerge.merge.methods.sparsify import MagnitudeTable, Trim, keep_count, trim

GAMMA = Value(0.01, search=(0.0, 0.05), low=0.0, high=1.0)
"""The share of the largest-magnitude entries dropped as outliers (mergekit's default 0.01)."""

NOTHING = Trim(math.inf, 0)  # keeps no entry


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """mergekit's counts: (entries kept, largest entries dropped above them)."""
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - keep - top)
    return keep, numel - bottom - keep


def _top(base: Tensor, tensor: Tensor, count: int, table: MagnitudeTable | None) -> Trim:
    """The ``count`` largest entries of |tensor - base| (ties by index, as `trim`)."""
    numel = base.numel()
    if count <= 0:
        return NOTHING
    if count >= numel:
        return Trim(0.0, numel)
    density = (count + 0.5) / numel  # keep_count's int(density * numel) is exactly count
    assert keep_count(numel, density) == count
    return trim(base, tensor, density, table)


def outlier_trim(base: Tensor, tensor: Tensor, density: float, gamma: float,
                 table: MagnitudeTable | None = None) -> tuple[Trim, Trim]:
    """Breadcrumbs' selection of ``tensor - base``: kept = in the first `Trim` and not in the second (the top
    keep + dropped entries, and the top dropped ones).  Density 1 keeps every entry.  (A cut at magnitude 0
    keeps -- or, as the outliers' cut, drops -- every zero delta: the same merge, a zero adds nothing.)"""
    if density >= 1.0:
        return Trim(0.0, base.numel()), NOTHING
    keep, dropped = outlier_counts(base.numel(), density, gamma)
    return _top(base, tensor, keep + dropped, table), _top(base, tensor, dropped, table)


def _kept(magnitude: Tensor, position: Tensor, threshold: Tensor, cut: Tensor) -> Tensor:
    return (magnitude > threshold) | ((magnitude == threshold) & (position < cut))


def _selection(delta: Tensor, position: Tensor, thresholds: Tensor, cuts: Tensor) -> Tensor:
    """Entries kept: in the upper trim (``thresholds[0]``, ``cuts[0]``) and not in the outliers' trim
    (``thresholds[1]``, ``cuts[1]``)."""
    magnitude = delta.abs()
    return _kept(magnitude, position, thresholds[0], cuts[0]) & ~_kept(magnitude, position, thresholds[1], cuts[1])


def _l1_kernel(base: Tensor, tensor: Tensor, thresholds: Tensor, cuts: Tensor) -> Tensor:
    delta = tensor.float() - base.float()
    position = torch.arange(base.numel(), device=base.device)
    kept = _selection(delta, position, thresholds, cuts)
    magnitude = delta.abs()
    return torch.stack([magnitude.sum(dtype=torch.float64), torch.where(kept, magnitude, 0.0).sum(dtype=torch.float64)])


def _breadcrumbs_kernel(
    out: Tensor,
    base: Tensor,
    tensors: list[Tensor],
    thresholds: Tensor,
    cuts: Tensor,
    factors: Tensor,
    weights: Tensor,
    divisor: Tensor,
    scale: Tensor,
    consensus: bool,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    position = torch.arange(base.numel(), device=base.device)
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        kept = _selection(delta, position, thresholds[index], cuts[index])
        weighted.append(torch.where(kept, delta * factors[index], 0.0) * weights[index])
    out.copy_(base32 + combine(weighted, weights, divisor, consensus, normalize) * scale)
    return out


def breadcrumbs(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: bool,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    tables: Sequence[MagnitudeTable | None] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Drop each task vector's gamma share of largest and its smallest entries so a density share remains
    (`outlier_trim`); then, with ``consensus`` (breadcrumbs_ties), TIES sign election and disjoint merge, else
    (breadcrumbs) base + scale * sum(w_i s_i m_i (theta_i - base)) (/ sum w_i with ``normalize``).  ``tables``
    (one `magnitude_table` per model) only save work."""
    out = output(out, base)
    device = out.device
    tables = tables or [None] * len(tensors)
    trims = [outlier_trim(base, tensor, density, gamma, table)
             for tensor, density, gamma, table in zip(tensors, densities, gammas, tables)]
    thresholds = torch.tensor([[upper.threshold, outliers.threshold] for upper, outliers in trims],
                              dtype=torch.float32, device=device)
    cuts = torch.tensor([[upper.cut, outliers.cut] for upper, outliers in trims], dtype=torch.int64, device=device)
    factors = []
    for index, (tensor, density) in enumerate(zip(tensors, densities)):
        if not rescale or density >= 1.0:
            factors.append(1.0)
            continue
        before, after = run_kernel(_l1_kernel, base.numel(), flat(base), flat(tensor), thresholds[index],
                                   cuts[index]).tolist()
        factors.append(before / after if before >= L1_EPS and after >= L1_EPS else 1.0)
    run_kernel(
        _breadcrumbs_kernel,
        out.numel(),
        flat(out),
        flat(base),
        [flat(tensor) for tensor in tensors],
        thresholds,
        cuts,
        as_vector(factors, device),
        as_vector(weights, device),
        weight_divisor(weights, normalize, device),
        as_scalar(scale, device),
        consensus,
        normalize,
    )
    return out


def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    if not half:
        return []
    return [f"Breadcrumbs keeps the same number of entries in both tools and the same entries away from its two "
            f"magnitude cuts, but mergekit chooses among the entries tied at a cut with an unstable sort where "
            f"evomerge ranks them by index; {half[0]} task vectors tie a lot, so the two models can differ in those "
            "tied entries (by one kept delta each)"]


def _breadcrumbs_merge(consensus: bool):
    def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, density: PerModel = DENSITY, gamma: PerModel = GAMMA,
              lambda_: Finite = 1.0, normalize: bool = False, rescale: bool = False) -> Tensor:
        return breadcrumbs(inputs.base, inputs.tensors, weight, density, gamma, consensus=consensus, scale=lambda_,
                            normalize=normalize, rescale=rescale, tables=inputs.magnitude_tables, out=inputs.out)
    return merge


PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks " \
        "(arXiv:2312.06795)"
merge_method("breadcrumbs", paper=PAPER, mergekit=Mergekit("breadcrumbs", notes=_notes), magnitude_tables=True)(
    _breadcrumbs_merge(consensus=False))
merge_method("breadcrumbs_ties", paper=PAPER, mergekit=Mergekit("breadcrumbs_ties", notes=_notes),
             magnitude_tables=True)(_breadcrumbs_merge(consensus=True))
