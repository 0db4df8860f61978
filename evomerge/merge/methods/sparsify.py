"""Which entries of a task vector a method keeps: TIES's exact top-k trim (without sorting) and DARE's
counter-based random drops.

A top-``density`` trim keeps exactly k = keep_count(numel, density) entries of a task vector: every entry whose
|delta| is above t, the k-th largest |delta|, and of the entries equal to t the first ones in flat (row-major)
order until k are kept: what a stable descending sort keeps, torch.argsort(|delta|, descending=True,
stable=True)[:k].  mergekit 0.1.5's `sparsify.magnitude` sorts the same way but not stably, so it keeps the same
number of entries and the same entries above t, and its sort's own choice among the ties (std::sort's on the
CPU; scripts/gpu_check.py reports how often CUDA's agrees with ours).  Ties are common in half precision: a
bf16 fine-tune's deltas are multiples of a few ulps.

Nothing is sorted.  Non-negative floats order like their int32 bit patterns, so a task vector's distinct
magnitudes are found by counting bit patterns (`MagnitudeTable`, one bincount plus a unique() of the few
entries that are not exact in the checkpoint dtype); the k-th largest is then a lookup in the running counts.
Where only some ties are kept, the flat position of the last one kept is found by counting them in one run of
`_SKETCH_CHUNK` entries, picked with the table's sketch (the most tied magnitudes' counts per run), or for
other magnitudes run by run from the nearer end of the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK, LOW31, as_scalar, flat, hash_draws, run_kernel, scratch

TIE_CHUNK = 1 << 14
_SKETCH_CHUNK = 1 << 18  # a multiple of TIE_CHUNK that divides BITS_CHUNK
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


def _magnitude_bits(base: Tensor, tensor: Tensor) -> Iterator[Tensor]:
    """|tensor - base| as int32 bit patterns, `BITS_CHUNK` entries at a time (each valid until the next), so
    counting never holds more than a few MB of temporaries, whatever the tensor's size."""
    base, tensor = flat(base), flat(tensor)
    for start in range(0, base.numel(), BITS_CHUNK):
        stop = min(start + BITS_CHUNK, base.numel())
        magnitudes = run_kernel(_abs_delta_kernel, stop - start, scratch(stop - start, base.device),
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
    """(i // _SKETCH_CHUNK) * stride for the entries i of a `BITS_CHUNK` (int32, cached)."""
    key = (stride, BITS_CHUNK, _SKETCH_CHUNK, device)
    if key not in _offsets:
        runs = torch.arange(BITS_CHUNK, dtype=torch.int32, device=device) // _SKETCH_CHUNK
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
        keys = run_kernel(_exact_key_kernel, size, scratch(size, base.device, torch.int32), bits, shift)
        rest.append(bits[torch.eq(keys, bins, out=scratch(size, base.device, torch.bool))])
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
        counts.append(run_kernel(_tie_count_kernel, whole, base[:whole], tensor[:whole], threshold))
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
    base, tensor = flat(base), flat(tensor)
    numel = base.numel()
    value = as_scalar(threshold, base.device)
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



def dare_key(seed: int, tensor_name: str, model_index: int) -> tuple[int, int]:
    """Key of one tensor's DARE draws, from (recipe seed, tensor name, model index): the same recipe gives
    the same mask in any process and on either merge path."""
    digest = hashlib.sha256(f"{seed}/{tensor_name}/{model_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & LOW31, int.from_bytes(digest[4:8], "little") & LOW31


def dare_draws(numel: int, key: tuple[int, int]) -> Tensor:
    """The uniform draws DARE compares with density for each entry (kept when draw < density)."""
    return hash_draws(numel, torch.tensor(key, dtype=torch.int64))

