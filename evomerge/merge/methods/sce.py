"""SCE (Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990): Select, Calculate, Erase.

With task vectors tau_i = theta_i - base (i = 1..n), per tensor:

* Select: keep the k = int(nnz(var) * select_topk) entries whose variance across the models,
  var_j = (1/n) sum_i (tau_ij - mean_i tau_ij)^2, is largest (every entry when select_topk = 1);
  tau_i <- m * tau_i with m that 0/1 mask;
* Calculate: w_i = mean_j(tau_ij^2) / sum_l mean_j(tau_lj^2), the share of the (selected) task vectors' mean
  squares (equal weights 1/n when that sum is below 1e-6, as mergekit 0.1.5 does);
* Erase: elect a sign per entry by the summed (unweighted) task vectors, s_j = +1 where sum_i tau_ij >= 0 else -1,
  and average the entries that agree: merged_j = base_j + sum_i [sign(tau_ij) = s_j] w_i tau_ij /
  max(sum_i [sign(tau_ij) = s_j] w_i, 1e-6).

This is mergekit 0.1.5's ``sce`` (mergekit/merge_methods/sce.py) in the same float32 operations and order: the
variance is Welford's in float64 rounded to float32 (what ``torch.var(unbiased=False)`` computes on the CPU, so
the selection ranks the same numbers), the sums over models run in model order.  Two differences, both at the
level of rounding: the mean squares are summed in float64 (mergekit: float32), and among entries whose variance
equals the k-th largest evomerge keeps the lowest flat indices where mergekit keeps what ``torch.topk`` returns
(implementation-defined); they keep the same number of entries and the same ones above the tie.  Such ties are
common in half precision (two bf16 models' deltas are multiples of a few ulps) and rare in float32.

mergekit's ``int8_mask`` only stores the masks in int8 to save memory and does not change the result; evomerge
never materialises the masks, so it has no such option.

Memory: nothing of the tensor's size is allocated besides the output.  The tensor is walked in chunks of
`BITS_CHUNK` entries (a float32 variance chunk and its int32 bit patterns, 8 MB each, in reused scratch):
with select_topk < 1, one pass counts the variances' top 16 bits (a 32768-bin histogram), one counts the low
bits inside the bucket holding the k-th largest (65536 bins) and, only when the k-th largest is tied and not all
of its ties are kept, one finds the flat position of the last tie kept; then one pass sums each model's masked
squares (float64) and one writes the merge.  Each pass recomputes the variance (cheap, element-wise) instead of
keeping 4 bytes per entry (235 MB for a 58.7M-entry tensor); mergekit stacks the task vectors (n x 4 bytes per
entry) and keeps the variance, the mask and the weighted products besides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK, as_scalar, as_vector, flat, output, run_kernel, scratch
from evomerge.merge.methods.registry import Inputs, Mergekit, PerGroup, Value, merge_method

SELECT_TOPK = Value(1.0, search=(0.1, 1.0), low=0.0, high=1.0, low_open=True)
"""The share of the entries with a nonzero variance across the task vectors that SCE keeps (the most varied)."""

_HIGH_BITS = 16  # the histograms split a float32's 31 non-sign bits into the top 15 and the low 16


def _variance(base: Tensor, tensors: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The float32 task vectors and their population variance across models: Welford's update in float64,
    rounded to float32, which is bit for bit what torch.var(stacked, dim=0, unbiased=False) gives on the CPU."""
    base32 = base.float()
    deltas = [tensor.float() - base32 for tensor in tensors]
    mean = torch.zeros_like(deltas[0], dtype=torch.float64)
    squares = torch.zeros_like(mean)
    for index, delta in enumerate(deltas):
        value = delta.double()
        step = value - mean
        mean = mean + step / (index + 1)
        squares = squares + step * (value - mean)
    return deltas, (squares / len(deltas)).float()


def _selected(deltas: list[Tensor], variance: Tensor, threshold: Tensor, cut: Tensor, start: Tensor) -> list[Tensor]:
    position = torch.arange(variance.numel(), device=variance.device) + start
    kept = (variance > threshold) | ((variance == threshold) & (position < cut))
    return [torch.where(kept, delta, 0.0) for delta in deltas]


def _variance_kernel(out: Tensor, base: Tensor, tensors: list[Tensor]) -> Tensor:
    out.copy_(_variance(base, tensors)[1])
    return out


def _squares_kernel(base: Tensor, tensors: list[Tensor], threshold: Tensor, cut: Tensor, start: Tensor,
                    select: bool) -> Tensor:
    """Per model, the sum of its (selected) task vector's squares over this chunk, in float64."""
    if select:
        deltas, variance = _variance(base, tensors)
        deltas = _selected(deltas, variance, threshold, cut, start)
    else:
        deltas = [tensor.float() - base.float() for tensor in tensors]
    return torch.stack([delta.double().square().sum() for delta in deltas])


def _sce_kernel(out: Tensor, base: Tensor, tensors: list[Tensor], weights: Tensor, threshold: Tensor, cut: Tensor,
                start: Tensor, select: bool) -> Tensor:
    base32 = base.float()
    if select:
        deltas, variance = _variance(base, tensors)
        deltas = _selected(deltas, variance, threshold, cut, start)
    else:
        deltas = [tensor.float() - base32 for tensor in tensors]
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    positive = total >= 0  # the elected sign: + where the selected task vectors sum to >= 0
    merged = divisor = None
    for index, delta in enumerate(deltas):
        erased = torch.where(torch.where(positive, delta > 0, delta < 0), weights[index], 0.0)
        merged = delta * erased if merged is None else merged + delta * erased
        divisor = erased if divisor is None else divisor + erased
    out.copy_(base32 + merged / divisor.clamp(min=1e-6))
    return out


@dataclass(frozen=True)
class Selection:
    """The entries SCE keeps: variance > ``threshold``, and variance == ``threshold`` at flat index < ``cut``."""

    threshold: float
    cut: int


def _chunks(numel: int):
    for start in range(0, numel, BITS_CHUNK):
        yield start, min(start + BITS_CHUNK, numel)


def _variance_bits(base: Tensor, tensors: Sequence[Tensor]):
    """(start, int32 bit patterns of the float32 variances) chunk by chunk, each valid until the next."""
    base, tensors = flat(base), [flat(tensor) for tensor in tensors]
    for start, stop in _chunks(base.numel()):
        variance = run_kernel(_variance_kernel, stop - start, scratch(stop - start, base.device), base[start:stop],
                              [tensor[start:stop] for tensor in tensors])
        yield start, variance.view(torch.int32)


def _kth_largest(histogram: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram of keys (k >= 1) and how many entries lie above it."""
    running = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(running, k))
    return histogram.numel() - 1 - index, int(running[index - 1]) if index else 0


def top_variance(base: Tensor, tensors: Sequence[Tensor], fraction: float) -> Selection | None:
    """SCE's selection: the k = int(nnz(var) * fraction) entries of largest variance across the task vectors (as
    mergekit counts k: the nonzero count times the fraction in float32), ties at the k-th largest broken by the
    lowest flat index; None (keep everything) when ``fraction`` >= 1.  Found by two histogram passes over the
    variances' float32 bit patterns (non-negative floats order like their bits), without sorting."""
    if fraction >= 1:
        return None
    device = base.device
    high = torch.zeros(1 << (31 - _HIGH_BITS), dtype=torch.int64, device=device)
    nonzero = torch.zeros((), dtype=torch.int64, device=device)
    for _, bits in _variance_bits(base, tensors):
        nonzero += torch.count_nonzero(bits)
        high += torch.bincount(bits >> _HIGH_BITS, minlength=high.numel())
    k = int(nonzero * fraction)  # mergekit: int(count_nonzero(var) * density), a float32 product
    if k <= 0:
        return Selection(math.inf, 0)
    bucket, above = _kth_largest(high, k)
    low = torch.zeros(1 << _HIGH_BITS, dtype=torch.int64, device=device)
    for _, bits in _variance_bits(base, tensors):
        inside = bits[(bits >> _HIGH_BITS) == bucket]
        low += torch.bincount(inside & ((1 << _HIGH_BITS) - 1), minlength=low.numel())
    value, above_in_bucket = _kth_largest(low, k - above)
    key = (bucket << _HIGH_BITS) | value
    threshold = float(torch.tensor(key, dtype=torch.int32).view(torch.float32))
    rank, ties = k - above - above_in_bucket, int(low[value])  # keep the first `rank` of the `ties` tied entries
    if rank == ties:
        return Selection(threshold, base.numel())
    seen = 0
    for start, bits in _variance_bits(base, tensors):
        tied = bits == key
        count = int(tied.sum())
        if seen + count >= rank:
            return Selection(threshold, start + int(tied.nonzero()[rank - seen - 1]) + 1)
        seen += count
    raise AssertionError("fewer tied variances than counted")  # pragma: no cover - the histogram counted them


def sce_weights(base: Tensor, tensors: Sequence[Tensor], selection: Selection | None) -> list[float]:
    """Each model's weight: its selected task vector's mean square over their sum (float32, as mergekit), or 1/n
    each when that sum is below 1e-6."""
    device = base.device
    select = selection is not None
    threshold = as_scalar(selection.threshold if select else 0.0, device)
    cut = torch.tensor(selection.cut if select else 0, dtype=torch.int64, device=device)
    sums = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    base_flat, flats = flat(base), [flat(tensor) for tensor in tensors]
    for start, stop in _chunks(base.numel()):
        sums += run_kernel(_squares_kernel, stop - start, base_flat[start:stop], [t[start:stop] for t in flats],
                           threshold, cut, torch.tensor(start, dtype=torch.int64, device=device), select)
    weights = (sums / max(base.numel(), 1)).float()
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return (torch.ones_like(weights) / weights.shape[0]).tolist()
    return (weights / total).tolist()


def sce(base: Tensor, tensors: Sequence[Tensor], select_topk: float = 1.0, *, out: Tensor | None = None) -> Tensor:
    """SCE merge of one tensor (see the module docstring): select the ``select_topk`` most varied entries,
    weight the models by their mean squares, and average the entries that agree with the elected sign."""
    selection = top_variance(base, tensors, select_topk) if base.numel() else None
    weights = sce_weights(base, tensors, selection)
    out = output(out, base)
    device, select = base.device, selection is not None
    threshold = as_scalar(selection.threshold if select else 0.0, device)
    cut = torch.tensor(selection.cut if select else 0, dtype=torch.int64, device=device)
    out_flat, base_flat, flats = flat(out), flat(base), [flat(tensor) for tensor in tensors]
    weight_vector = as_vector(weights, device)
    for start, stop in _chunks(base.numel()):
        run_kernel(_sce_kernel, stop - start, out_flat[start:stop], base_flat[start:stop],
                   [t[start:stop] for t in flats], weight_vector, threshold, cut,
                   torch.tensor(start, dtype=torch.int64, device=device), select)
    return out


def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    if not half or all(group["select_topk"] >= 1 for group in recipe.groups):
        return []
    return [f"SCE keeps the same number of entries in both tools and the same entries above each tensor's k-th "
            f"largest variance, but among the entries whose variance equals it mergekit keeps what torch.topk returns "
            f"where evomerge keeps the lowest indices; {half[0]} task vectors tie a lot, so the two models can "
            "differ in those tied entries"]


@merge_method("sce", paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (arXiv:2408.07990)",
              mergekit=Mergekit("sce", notes=_notes))
def merge(inputs: Inputs, *, select_topk: PerGroup = SELECT_TOPK) -> Tensor:
    return sce(inputs.base, inputs.tensors, select_topk, out=inputs.out)
