"""Merge methods as pure tensor functions, plus the thin per-tensor dispatch both merge paths share.

Every function takes the tensors of one parameter (base and/or one per model), computes in float32 on their
device and returns the result in the checkpoint dtype (``out``'s dtype when given, written in place).  No I/O,
no models.

The element-wise core of each method is a small kernel.  For large tensors it runs through
``torch.compile`` so the dozen element-wise steps fuse into one pass over memory -- this is what makes an
in-memory candidate merge of a 200M-parameter model take well under a second.  Which form runs depends only
on the tensor's size, so the disk path and the in-memory path always run the same code on the same tensor.
Set ``EVOMERGE_COMPILE=0`` to stay eager (e.g. where no C++ compiler is available).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from evomerge.recipe import GroupValues, PSRecipe

COMPILE_MIN_NUMEL = 1 << 16
_compile_enabled = os.environ.get("EVOMERGE_COMPILE", "1") != "0"
_compiled_kernels: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}


def _run_kernel(kernel: Callable[..., Tensor], numel: int, *args: Any) -> Tensor:
    """Run ``kernel`` compiled for big tensors, eagerly for small ones (compiling costs seconds once)."""
    global _compile_enabled
    if _compile_enabled and numel >= COMPILE_MIN_NUMEL:
        compiled = _compiled_kernels.get(kernel)
        if compiled is None:
            # One kernel specialises per model count, dtype and flag; allow enough variants not to fall back.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = _compiled_kernels[kernel] = torch.compile(kernel, dynamic=True)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - a missing toolchain must not stop a merge
            warnings.warn(f"torch.compile unavailable ({error!r}); merging eagerly", RuntimeWarning, stacklevel=2)
            _compile_enabled = False
    return kernel(*args)


def _flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1)


def _output(out: Tensor | None, like: Tensor) -> Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not out.is_contiguous():
        raise ValueError("merge output must be contiguous: kernels write through a flat view of it")
    return out


def _as_vector(values: Sequence[float], device: torch.device) -> Tensor:
    """Per-model scalars as a float32 vector on the tensors' device (a compiled kernel takes no mixed devices)."""
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def _as_scalar(value: float, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- kernels
# Each kernel reads its inputs once and writes ``out`` once; torch.compile fuses everything in between.


def _weighted_sum_kernel(out: Tensor, tensors: list[Tensor], weights: Tensor, divisor: Tensor) -> Tensor:
    # mergekit's rounding: the first product in float32, then one fused multiply-add (torch.addcmul) per further
    # model.  The fused step runs in float64, where a float32 weight times a bf16/fp16/fp32 value is exact, and
    # is rounded to float32 once; so on bf16 inputs, whose weighted means often fall on a rounding midpoint,
    # both tools round the same way.
    total = tensors[0].float() * weights[0]
    for index in range(1, len(tensors)):
        total = (total.double() + tensors[index].double() * weights[index].double()).float()
    out.copy_(total / divisor)
    return out


def _task_sum_kernel(
    out: Tensor, base: Tensor, tensors: list[Tensor], weights: Tensor, divisor: Tensor, scale: Tensor
) -> Tensor:
    base32 = base.float()
    total = (tensors[0].float() - base32) * weights[0]
    for index in range(1, len(tensors)):
        total = total + (tensors[index].float() - base32) * weights[index]
    out.copy_(base32 + total / divisor * scale)
    return out


def _disjoint_mean(weighted: list[Tensor], weights: Tensor, normalize: bool) -> Tensor:
    """TIES consensus: elect a sign per element by summed mass, keep only entries of that sign."""
    total = weighted[0]
    for index in range(1, len(weighted)):
        total = total + weighted[index]
    positive = total >= 0
    agreeing = torch.zeros_like(total)
    agreeing_weight = torch.zeros_like(total)
    for index, entry in enumerate(weighted):
        agrees = torch.where(positive, entry > 0, entry < 0)
        agreeing = agreeing + torch.where(agrees, entry, 0.0)
        if normalize:
            agreeing_weight = agreeing_weight + torch.where(agrees, weights[index], 0.0)
    if normalize:
        agreeing = agreeing / torch.where(agreeing_weight == 0, 1.0, agreeing_weight)
    return agreeing


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
    out.copy_(base32 + _disjoint_mean(weighted, weights, normalize) * scale)
    return out


_LOW31 = (1 << 31) - 1
_HASH_MULTIPLIER = 0x45D9F3B


def _mix31(values: Tensor) -> Tensor:
    """Integer hash of int64 values in [0, 2^31): multiply-xorshift rounds whose products stay below 2^58."""
    values = ((values ^ (values >> 16)) * _HASH_MULTIPLIER) & _LOW31
    values = ((values ^ (values >> 16)) * _HASH_MULTIPLIER) & _LOW31
    return values ^ (values >> 16)


def _hash_draws(numel: int, key: Tensor) -> Tensor:
    """Uniform draws in [0, 1) on a 2^-24 grid, a pure function of (entry index, key): counter-based, so they
    fuse into the merge kernel instead of being generated and stored."""
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    mixed = _mix31(_mix31((index + key[0]) & _LOW31) ^ key[1])
    return (mixed >> 7).float() * (2.0**-24)


def _dare_kernel(
    out: Tensor,
    base: Tensor,
    tensors: list[Tensor],
    keys: Tensor,
    weights: Tensor,
    densities: Tensor,
    rescales: Tensor,
    divisor: Tensor,
    scale: Tensor,
    consensus: bool,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        kept = torch.where(_hash_draws(base.numel(), keys[index]) < densities[index], delta * rescales[index], 0.0)
        weighted.append(kept * weights[index])
    if consensus:
        merged = _disjoint_mean(weighted, weights, normalize)
    else:
        merged = weighted[0]
        for index in range(1, len(weighted)):
            merged = merged + weighted[index]
        merged = merged / divisor
    out.copy_(base32 + merged * scale)
    return out


def _dare_l1_kernel(base: Tensor, tensor: Tensor, key: Tensor, density: Tensor) -> Tensor:
    magnitudes = (tensor.float() - base.float()).abs()
    kept = torch.where(_hash_draws(base.numel(), key) < density, magnitudes, 0.0)
    return torch.stack([magnitudes.sum(dtype=torch.float64), kept.sum(dtype=torch.float64)])


def _abs_delta_kernel(out: Tensor, base: Tensor, tensor: Tensor) -> Tensor:
    out.copy_((tensor.float() - base.float()).abs())
    return out


def _exact_key_kernel(out: Tensor, bits: Tensor, shift: int) -> Tensor:
    """For int32 bit patterns of magnitudes: the high bits (>> ``shift``) of those exact in the checkpoint dtype
    (low ``shift`` bits zero), 2^(31 - shift) -- one past the last of those -- for the others."""
    out.copy_(torch.where((bits & ((1 << shift) - 1)) != 0, 1 << (31 - shift), bits >> shift))
    return out


def _tie_count_kernel(base: Tensor, tensor: Tensor, threshold: Tensor) -> Tensor:
    """Per run of TIE_CHUNK entries, how many have |tensor - base| == threshold (numel a multiple of TIE_CHUNK)."""
    equal = (tensor.float() - base.float()).abs() == threshold
    return equal.view(-1, TIE_CHUNK).sum(1)


def _all_finite_kernel(tensor: Tensor) -> Tensor:
    return torch.isfinite(tensor).all()


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


def _blend_kernel(out: Tensor, first: Tensor, second: Tensor, coefficients: Tensor) -> Tensor:
    out.copy_(first.float() * coefficients[0] + second.float() * coefficients[1])
    return out


# --------------------------------------------------------------------------- methods


def _weight_divisor(weights: Sequence[float], normalize: bool, device: torch.device) -> Tensor:
    """sum(weights) summed in float32 (as mergekit does), or 1 without ``normalize`` or when it is ~0."""
    total = _as_vector(weights, device).sum()
    return total if normalize and abs(float(total)) >= 1e-8 else _as_scalar(1.0, device)


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Weighted average sum(w_i * theta_i) / sum(w_i); without ``normalize`` the plain weighted sum."""
    out = _output(out, tensors[0])
    _run_kernel(
        _weighted_sum_kernel,
        out.numel(),
        _flat(out),
        [_flat(tensor) for tensor in tensors],
        _as_vector(weights, out.device),
        _weight_divisor(weights, normalize, out.device),
    )
    return out


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
    out = _output(out, base)
    _run_kernel(
        _task_sum_kernel,
        out.numel(),
        _flat(out),
        _flat(base),
        [_flat(tensor) for tensor in tensors],
        _as_vector(weights, out.device),
        _weight_divisor(weights, normalize, out.device),
        _as_scalar(scale, out.device),
    )
    return out


# --------------------------------------------------------------------------- TIES trim: exactly k entries
#
# A top-``density`` trim keeps exactly k = keep_count(numel, density) entries of a task vector: every entry whose
# |delta| is above t, the k-th largest |delta|, and of the entries equal to t the first ones in flat (row-major)
# order until k are kept: what a stable descending sort keeps, torch.argsort(|delta|, descending=True,
# stable=True)[:k].  mergekit 0.1.5's `sparsify.magnitude` sorts the same way but not stably, so it keeps the same
# number of entries and the same entries above t, and its sort's own choice among the ties (std::sort's on the
# CPU; scripts/gpu_check.py reports how often CUDA's agrees with ours).  Ties are common in half precision: a
# bf16 fine-tune's deltas are multiples of a few ulps.
#
# Nothing is sorted.  Non-negative floats order like their int32 bit patterns, so a task vector's distinct
# magnitudes are found by counting bit patterns (`MagnitudeTable`, one bincount plus a unique() of the few
# entries that are not exact in the checkpoint dtype); the k-th largest is then a lookup in the running counts.
# Where only some ties are kept, the flat position of the last one kept is found by counting them in one run of
# `_SKETCH_CHUNK` entries, picked with the table's sketch (the most tied magnitudes' counts per run), or for
# other magnitudes run by run from the nearer end of the tensor.

TIE_CHUNK = 1 << 14
_SKETCH_CHUNK = 1 << 18  # a multiple of TIE_CHUNK that divides _BITS_CHUNK
_BITS_CHUNK = 1 << 21
_TABLE_MIN_CAP = 1 << 14
_SKETCH_MIN_TIES = 1 << 12  # magnitudes shared by this many entries get a sketch row ...
_SKETCH_ROWS = 1 << 10  # ... the most shared ones, at most: numel / 64 bytes
_COARSE_SHIFT = 16  # a coarse table counts the top 16 bits of the float32 magnitude: 2^15 buckets


def keep_count(numel: int, density: float) -> int:
    """How many entries a top-``density`` trim keeps: int(density * numel), at least one (mergekit's rule)."""
    return max(1, int(density * numel))


@dataclass(frozen=True)
class Trim:
    """The entries a trim keeps: |delta| > ``threshold``, and |delta| == ``threshold`` at flat index < ``cut``.
    (When the threshold is 0 every zero entry is kept: a zero adds nothing to a merge, and no pass is needed.)"""

    threshold: float
    cut: int


@dataclass(frozen=True)
class MagnitudeTable:
    """A task vector's |delta| values, largest first, with running counts, so a trim at any density is a lookup.

    ``keys`` are int32 bit patterns of float32 magnitudes shifted right by ``shift``: 0 when the table lists
    every distinct magnitude (half-precision checkpoints), else a coarse table of buckets (the top 16 bits,
    e.g. float32 checkpoints) whose trims refine their bucket with one pass.  ``through[i]``: how many entries
    have a key >= ``keys[i]`` (int32: a tensor has fewer than 2^31 entries).  Kept on the CPU: 8 bytes per
    distinct value or bucket; an exact table has at most max(16384, numel / 64) of them.
    """

    keys: Tensor
    through: Tensor
    shift: int
    sketch_keys: Tensor | None = None  # the most tied magnitudes' bit patterns, ascending
    sketch: Tensor | None = None  # and how many of each lie in each run of _SKETCH_CHUNK entries (int32)

    @property
    def nbytes(self) -> int:
        sketch = 0 if self.sketch is None else self.sketch_keys.nbytes + self.sketch.nbytes
        return self.keys.nbytes + self.through.nbytes + sketch

    def sketch_row(self, key: int) -> Tensor | None:
        """Per `_SKETCH_CHUNK` entries, how many have the magnitude with bit pattern ``key`` (None if not kept)."""
        if self.sketch_keys is None:
            return None
        index = int(torch.searchsorted(self.sketch_keys, key))
        found = index < self.sketch_keys.numel() and int(self.sketch_keys[index]) == key
        return self.sketch[index] if found else None


_scratch_buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _scratch(numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A reused buffer per device and dtype: a fresh multi-MB allocation per chunk costs page faults, and on the
    CPU leaves the heap fragmented (resident) long after."""
    buffer = _scratch_buffers.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        _scratch_buffers.pop((device, dtype), None)
        buffer = _scratch_buffers[device, dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _magnitude_bits(base: Tensor, tensor: Tensor) -> Iterator[Tensor]:
    """|tensor - base| as int32 bit patterns, `_BITS_CHUNK` entries at a time (each valid until the next), so
    counting never holds more than a few MB of temporaries, whatever the tensor's size."""
    base, tensor = _flat(base), _flat(tensor)
    for start in range(0, base.numel(), _BITS_CHUNK):
        stop = min(start + _BITS_CHUNK, base.numel())
        magnitudes = _run_kernel(_abs_delta_kernel, stop - start, _scratch(stop - start, base.device),
                                 base[start:stop], tensor[start:stop])
        yield magnitudes.view(torch.int32)


def _table(keys: Tensor, counts: Tensor, shift: int, sketch_keys: Tensor | None = None,
           sketch: Tensor | None = None) -> MagnitudeTable:
    order = torch.argsort(keys, descending=True)
    if sketch is not None:
        sketch_keys, sketch = sketch_keys.to("cpu", torch.int32), sketch.to("cpu", torch.int32)
    return MagnitudeTable(keys[order].to("cpu", torch.int32), counts[order].cumsum(0).to("cpu", torch.int32), shift,
                          sketch_keys, sketch)


_offsets: dict[tuple[int, int, int, torch.device], Tensor] = {}


def _run_offsets(stride: int, device: torch.device) -> Tensor:
    """(i // _SKETCH_CHUNK) * stride for the entries i of a `_BITS_CHUNK` (int32, cached)."""
    key = (stride, _BITS_CHUNK, _SKETCH_CHUNK, device)
    if key not in _offsets:
        runs = torch.arange(_BITS_CHUNK, dtype=torch.int32, device=device) // _SKETCH_CHUNK
        _offsets[key] = runs * stride
    return _offsets[key]


def _exact_table(base: Tensor, tensor: Tensor, shift: int) -> MagnitudeTable | None:
    """Every distinct magnitude, where few: one bincount of those exact in the checkpoint dtype (their low
    ``shift`` bits are zero) plus a unique() of the rest; None when the rest or the table would be large.
    The same bincount counts the most tied magnitudes per `_SKETCH_CHUNK` entries: the table's sketch."""
    numel, bins = base.numel(), 1 << (31 - shift)
    per_chunk, rest, rest_count = [], [], 0
    for bits in _magnitude_bits(base, tensor):
        size = bits.numel()
        keys = _run_kernel(_exact_key_kernel, size, _scratch(size, base.device, torch.int32), bits, shift)
        rest.append(bits[torch.eq(keys, bins, out=_scratch(size, base.device, torch.bool))])
        rest_count += rest[-1].numel()
        if rest_count > numel // 8:
            return None
        runs = -(-size // _SKETCH_CHUNK)  # counted per run of _SKETCH_CHUNK entries: one bincount
        keys += _run_offsets(bins + 1, base.device)[:size]
        per_chunk.append(torch.bincount(keys, minlength=runs * (bins + 1)).view(runs, bins + 1)[:, :bins].int())
    values, value_counts = torch.unique(torch.cat(rest), return_counts=True)
    per_chunk = torch.cat(per_chunk)
    counts = per_chunk.sum(0, dtype=torch.int64)
    present = counts.nonzero().squeeze(1)
    if present.numel() + values.numel() > max(_TABLE_MIN_CAP, numel // 64):  # at most 1/8 byte per entry
        return None
    sketch_keys = sketch = None
    if per_chunk.shape[0] > 1:
        heavy = (counts >= _SKETCH_MIN_TIES).nonzero().squeeze(1)
        if heavy.numel() > _SKETCH_ROWS:
            heavy = heavy[counts[heavy].topk(_SKETCH_ROWS).indices].sort().values
        sketch_keys, sketch = heavy.int() << shift, per_chunk[:, heavy].T.contiguous()
    keys = torch.cat([present.int() << shift, values])
    return _table(keys, torch.cat([counts[present], value_counts]), 0, sketch_keys, sketch)


def magnitude_table(base: Tensor, tensor: Tensor) -> MagnitudeTable:
    """The `MagnitudeTable` of ``tensor - base``: exact when the distinct magnitudes are few, else coarse."""
    if base.numel() == 0:
        return MagnitudeTable(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0)
    mantissa = max(round(-math.log2(torch.finfo(dtype).eps)) for dtype in (base.dtype, tensor.dtype))
    shift = 23 - mantissa  # low float32 bits that are zero when |delta| is exact in the checkpoint dtype
    table = _exact_table(base, tensor, shift) if shift >= 13 else None  # bf16 (16) or fp16 (13)
    if table is not None:
        return table
    counts = torch.zeros(1 << (31 - _COARSE_SHIFT), dtype=torch.int64, device=base.device)
    for bits in _magnitude_bits(base, tensor):
        counts += torch.bincount(bits >> _COARSE_SHIFT, minlength=counts.numel())
    present = counts.nonzero().squeeze(1)
    return _table(present, counts[present], _COARSE_SHIFT)


def _float_of_bits(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _tie_mask(base: Tensor, tensor: Tensor, threshold: Tensor) -> Tensor:
    return (tensor.float() - base.float()).abs() == threshold


def _tie_counts(base: Tensor, tensor: Tensor, threshold: Tensor) -> Tensor:
    """How many entries of each run of TIE_CHUNK have |tensor - base| == threshold (flat inputs)."""
    numel = base.numel()
    whole = numel - numel % TIE_CHUNK
    counts = []
    if whole:
        counts.append(_run_kernel(_tie_count_kernel, whole, base[:whole], tensor[:whole], threshold))
    if whole < numel:
        counts.append(_tie_mask(base[whole:], tensor[whole:], threshold).sum().reshape(1))
    return torch.cat(counts)


def _find_tie(base: Tensor, tensor: Tensor, value: Tensor, start: int, stop: int, wanted: int,
              backward: bool = False) -> tuple[int, int]:
    """The flat index of the ``wanted``-th tied entry (|tensor - base| == value) in [start, stop), counted from
    ``start`` or, ``backward``, from ``stop`` (-1 if the range has fewer), and how many the range has."""
    counts = _tie_counts(base[start:stop], tensor[start:stop], value)
    found = int(counts.sum())
    if found < wanted:
        return -1, found
    running = (counts.flip(0) if backward else counts).cumsum(0)
    chunk = int(torch.searchsorted(running, wanted))
    wanted -= int(running[chunk - 1]) if chunk else 0
    first = start + (counts.numel() - 1 - chunk if backward else chunk) * TIE_CHUNK
    positions = _tie_mask(base[first:min(first + TIE_CHUNK, stop)], tensor[first:min(first + TIE_CHUNK, stop)],
                          value).nonzero()
    return first + int(positions[-wanted if backward else wanted - 1]), found


def _tie_cut(base: Tensor, tensor: Tensor, threshold: float, rank: int, ties: int, sketch: Tensor | None) -> int:
    """One past the flat index of the ``rank``-th of the ``ties`` entries with |tensor - base| == ``threshold``.

    With the value's ``sketch`` row (its count per `_SKETCH_CHUNK` entries) one chunk is read; without, the
    tensor is counted segment by segment from the nearer end (a quarter of it on average)."""
    base, tensor = _flat(base), _flat(tensor)
    numel = base.numel()
    value = _as_scalar(threshold, base.device)
    if sketch is not None:
        running = sketch.cumsum(0)
        chunk = int(torch.searchsorted(running, rank))
        start = chunk * _SKETCH_CHUNK
        index, _ = _find_tie(base, tensor, value, start, min(start + _SKETCH_CHUNK, numel),
                             rank - (int(running[chunk - 1]) if chunk else 0))
        return index + 1
    backward = 2 * rank > ties + 1
    wanted = ties - rank + 1 if backward else rank  # the wanted tie's number, counted from where the scan starts
    starts = range(0, numel, _SKETCH_CHUNK)
    for start in reversed(starts) if backward else starts:
        index, found = _find_tie(base, tensor, value, start, min(start + _SKETCH_CHUNK, numel), wanted, backward)
        if index >= 0:
            return index + 1
        wanted -= found
    raise AssertionError("fewer tied entries than counted")  # pragma: no cover - the table counted them


def trim(base: Tensor, tensor: Tensor, density: float, table: MagnitudeTable | None = None) -> Trim:
    """The top-``density`` trim of ``tensor - base`` (see the section comment); ``table`` (from
    `magnitude_table` on the same tensors) skips counting the magnitudes."""
    numel = base.numel()
    k = keep_count(numel, density)
    if k >= numel:
        return Trim(0.0, numel)
    if table is None:
        table = magnitude_table(base, tensor)
    index = int(torch.searchsorted(table.through, k))  # the first key with k or more entries at or above it
    above = int(table.through[index - 1]) if index else 0
    key = int(table.keys[index])
    if table.shift:  # a bucket: find the exact k-th largest among its entries
        inside = torch.cat([bits[(bits >> table.shift) == key] for bits in _magnitude_bits(base, tensor)])
        inside = inside.sort(descending=True).values
        key = int(inside[k - above - 1])
        above += int((inside > key).sum())
        ties = int((inside == key).sum())
    else:
        ties = int(table.through[index]) - above
    threshold = _float_of_bits(key)
    rank = k - above  # how many of the tied entries are kept, 1..ties
    if rank == ties or threshold == 0.0:
        return Trim(threshold, numel)
    return Trim(threshold, _tie_cut(base, tensor, threshold, rank, ties, table.sketch_row(key)))


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity anywhere in ``tensor`` (one fused pass, no temporary mask)."""
    if not tensor.is_floating_point():
        return True
    return bool(_run_kernel(_all_finite_kernel, tensor.numel(), _flat(tensor)))


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
    out = _output(out, base)
    _run_kernel(
        _ties_kernel,
        out.numel(),
        _flat(out),
        _flat(base),
        [_flat(tensor) for tensor in tensors],
        _as_vector(weights, out.device),
        _as_vector([kept.threshold for kept in trims], out.device),
        torch.tensor([kept.cut for kept in trims], dtype=torch.int64, device=out.device),
        _as_scalar(scale, out.device),
        normalize,
    )
    return out


def dare_key(seed: int, tensor_name: str, model_index: int) -> tuple[int, int]:
    """Key of one tensor's DARE draws, from (recipe seed, tensor name, model index): the same recipe gives
    the same mask in any process and on either merge path."""
    digest = hashlib.sha256(f"{seed}/{tensor_name}/{model_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & _LOW31, int.from_bytes(digest[4:8], "little") & _LOW31


def dare_draws(numel: int, key: tuple[int, int]) -> Tensor:
    """The uniform draws DARE compares with density for each entry (kept when draw < density)."""
    return _hash_draws(numel, torch.tensor(key, dtype=torch.int64))


def _dare_rescales(
    base: Tensor, tensors: Sequence[Tensor], keys: Tensor, densities: Sequence[float], rescale: str
) -> list[float]:
    """Survivor scale per model: 1/density (DARE paper) or, for ``l1``, the ratio restoring the L1 norm."""
    if rescale == "dare":
        return [1.0 / density for density in densities]
    factors = []
    for index, (tensor, density) in enumerate(zip(tensors, densities)):
        before, after = _run_kernel(
            _dare_l1_kernel, base.numel(), _flat(base), _flat(tensor), keys[index], _as_scalar(density, base.device)
        ).tolist()
        factors.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)  # mergekit's eps test
    return factors


def _dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[tuple[int, int]],
    *,
    consensus: bool,
    scale: float,
    normalize: bool,
    rescale: str,
    out: Tensor | None,
) -> Tensor:
    out = _output(out, base)
    key_table = torch.tensor(list(keys), dtype=torch.int64, device=base.device)
    _run_kernel(
        _dare_kernel,
        out.numel(),
        _flat(out),
        _flat(base),
        [_flat(tensor) for tensor in tensors],
        key_table,
        _as_vector(weights, out.device),
        _as_vector(densities, out.device),
        _as_vector(_dare_rescales(base, tensors, key_table, densities, rescale), out.device),
        _weight_divisor(weights, normalize, out.device),
        _as_scalar(scale, out.device),
        consensus,
        normalize,
    )
    return out


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[tuple[int, int]],
    *,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: str = "dare",
    out: Tensor | None = None,
) -> Tensor:
    """DARE-TIES: drop each delta entry with probability 1 - density (kept when its draw from `dare_draws`
    with that model's key is below density), rescale survivors, then TIES sign election and disjoint merge."""
    return _dare(base, tensors, weights, densities, keys, consensus=True, scale=scale,
                 normalize=normalize, rescale=rescale, out=out)


def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[tuple[int, int]],
    *,
    scale: float = 1.0,
    normalize: bool = False,
    rescale: str = "dare",
    out: Tensor | None = None,
) -> Tensor:
    """DARE drop-and-rescale (see `dare_ties`), then a weighted sum of the task vectors (task arithmetic)."""
    return _dare(base, tensors, weights, densities, keys, consensus=False, scale=scale,
                 normalize=normalize, rescale=rescale, out=out)


def slerp(t: float, first: Tensor, second: Tensor, *, out: Tensor | None = None, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``first`` (t=0) to ``second`` (t=1) along the great circle through the
    directions of the two whole tensors; nearly (anti)parallel tensors fall back to linear interpolation.
    As in mergekit, a norm at or below ``eps`` counts as 1 (a zero tensor is taken as orthogonal to the other).
    Norms and dot product are summed in float64, `_BITS_CHUNK` entries at a time (no full-size copies)."""
    a, b = _flat(first), _flat(second)
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _BITS_CHUNK):
        x, y = a[start:start + _BITS_CHUNK].double(), b[start:start + _BITS_CHUNK].double()
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
    out = _output(out, first)
    _run_kernel(_blend_kernel, out.numel(), _flat(out), a, b, _as_vector(coefficients, out.device))
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
    out = _output(out, tensors[0])
    _run_kernel(
        _fisher_kernel,
        out.numel(),
        _flat(out),
        [_flat(tensor) for tensor in tensors],
        [_flat(values.to(out.device)) for values in fishers],
        _as_vector(weights, out.device),
        _as_scalar(floor, out.device),
    )
    return out


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """RegMean's regulariser: scale the off-diagonal of a Gram matrix by ``alpha``, keep its diagonal."""
    gram = gram.float()
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def regmean(
    tensors: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 0.9,
    out: Tensor | None = None,
) -> Tensor:
    """RegMean for one linear layer (weight ``out x in``, Gram ``in x in`` of its inputs):
    W = (sum w_i W_i G_i)(sum w_i G_i)^-1 with each G_i's off-diagonal shrunk by ``alpha``; this W minimises
    sum_i w_i ||X_i W^T - X_i W_i^T||^2 plus the shrink's ridge.  Solved in float64 on the tensors' device."""
    device = tensors[0].device
    lhs = torch.zeros(grams[0].shape, dtype=torch.float64, device=device)
    rhs = torch.zeros((grams[0].shape[0], tensors[0].shape[0]), dtype=torch.float64, device=device)
    for tensor, gram, weight in zip(tensors, grams, weights):
        shrunk = shrink_gram(gram.to(device), alpha).double() * weight
        lhs += shrunk
        rhs += shrunk @ tensor.double().T
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:  # inputs never reached some features: take the minimum-norm solution
        if device.type == "cpu":
            solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
        else:  # CUDA's lstsq has no rank-revealing driver
            solution = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    out = _output(out, tensors[0])
    out.copy_(solution.T)
    return out


# --------------------------------------------------------------------------- recipe-level dispatch


def merge_tensor(
    recipe: PSRecipe,
    group: GroupValues,
    name: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    out: Tensor | None = None,
    magnitude_tables: Sequence[MagnitudeTable] | None = None,
    statistics: Mapping[str, Sequence[Tensor]] | None = None,
) -> Tensor:
    """Merge one named tensor the way ``recipe`` says for the layer ``group`` it belongs to.

    ``magnitude_tables`` (prepared once by the in-memory merger, one per model) spare TIES its counting pass;
    the result is the same without them.  ``statistics`` maps tensor names to per-model Fisher diagonals or
    Gram matrices (on any device: they are used on the tensors'); tensors it lacks are weight-averaged.
    """
    options = recipe.parameters
    method = recipe.method
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():
        out = _output(out, reference)
        out.copy_(reference)
        return out
    if method == "slerp":
        return slerp(float(group["t"]), tensors[0], tensors[1], out=out)
    weights = group["weight"]
    if method == "linear":
        return linear(tensors, weights, normalize=options["normalize"], out=out)
    if method == "fisher":
        per_model = statistics.get(name) if statistics else None
        if per_model is None:
            return linear(tensors, weights, normalize=True, out=out)
        return fisher(tensors, per_model, weights, floor=options["fisher_floor"], out=out)
    if method == "regmean":
        per_model = statistics.get(name) if statistics else None
        if per_model is None or reference.dim() != 2:
            return linear(tensors, weights, normalize=True, out=out)
        return regmean(tensors, per_model, weights, alpha=options["alpha"], out=out)
    assert base is not None
    if method == "task_arithmetic":
        return task_arithmetic(base, tensors, weights, scale=options["lambda"], normalize=options["normalize"], out=out)
    densities = group["density"]
    if method == "ties":
        return ties(base, tensors, weights, densities, scale=options["lambda"], normalize=options["normalize"],
                    tables=magnitude_tables, out=out)
    keys = [dare_key(options["seed"], name, index) for index in range(len(tensors))]
    dare = dare_ties if method == "dare_ties" else dare_linear
    return dare(base, tensors, weights, densities, keys, scale=options["lambda"],
                normalize=options["normalize"], rescale=options["rescale"], out=out)
