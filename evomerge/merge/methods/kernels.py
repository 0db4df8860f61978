"""What every merge method shares: running an element-wise kernel (compiled for big tensors), the weighted
sums and TIES's sign consensus, counter-based random draws, and reusable scratch memory.

Every method takes the tensors of one parameter (base and/or one per model), computes in float32 on their
device and returns the result in the checkpoint dtype (``out``'s dtype when given, written in place).

The element-wise core of each method is a small kernel.  For large tensors it runs through ``torch.compile``
so the dozen element-wise steps fuse into one pass over memory -- this is what makes an in-memory candidate
merge of a 200M-parameter model take well under a second.  Which form runs depends only on the tensor's size,
so the disk path and the in-memory path always run the same code on the same tensor.  Set
``EVOMERGE_COMPILE=0`` to stay eager (e.g. where no C++ compiler is available).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

COMPILE_MIN_NUMEL = 1 << 16
_compile_enabled = os.environ.get("EVOMERGE_COMPILE", "1") != "0"
_compiled_kernels: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}


def run_kernel(kernel: Callable[..., Tensor], numel: int, *args: Any) -> Tensor:
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


def flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1)


def output(out: Tensor | None, like: Tensor) -> Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not out.is_contiguous():
        raise ValueError("merge output must be contiguous: kernels write through a flat view of it")
    return out


def as_vector(values: Sequence[float], device: torch.device) -> Tensor:
    """Per-model scalars as a float32 vector on the tensors' device (a compiled kernel takes no mixed devices)."""
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def as_scalar(value: float, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- kernels
# Each kernel reads its inputs once and writes ``out`` once; torch.compile fuses everything in between.


def weighted_sum_kernel(out: Tensor, tensors: list[Tensor], weights: Tensor, divisor: Tensor) -> Tensor:
    # mergekit's rounding: the first product in float32, then one fused multiply-add (torch.addcmul) per further
    # model.  The fused step runs in float64, where a float32 weight times a bf16/fp16/fp32 value is exact, and
    # is rounded to float32 once; so on bf16 inputs, whose weighted means often fall on a rounding midpoint,
    # both tools round the same way.
    total = tensors[0].float() * weights[0]
    for index in range(1, len(tensors)):
        total = (total.double() + tensors[index].double() * weights[index].double()).float()
    out.copy_(total / divisor)
    return out


def task_sum_kernel(
    out: Tensor, base: Tensor, tensors: list[Tensor], weights: Tensor, divisor: Tensor, scale: Tensor
) -> Tensor:
    base32 = base.float()
    total = (tensors[0].float() - base32) * weights[0]
    for index in range(1, len(tensors)):
        total = total + (tensors[index].float() - base32) * weights[index]
    out.copy_(base32 + total / divisor * scale)
    return out


def disjoint_mean(weighted: list[Tensor], weights: Tensor, normalize: bool) -> Tensor:
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


def combine(weighted: list[Tensor], weights: Tensor, divisor: Tensor, consensus: bool, normalize: bool) -> Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge after sparsification: TIES sign consensus (``consensus``, divided
    by the agreeing weights with ``normalize``) or the plain sum divided by ``divisor`` (sum of weights or 1)."""
    if consensus:
        return disjoint_mean(weighted, weights, normalize)
    merged = weighted[0]
    for index in range(1, len(weighted)):
        merged = merged + weighted[index]
    return merged / divisor


L1_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` skips the rescale when either norm is below this


LOW31 = (1 << 31) - 1
_HASH_MULTIPLIER = 0x45D9F3B


def _mix31(values: Tensor) -> Tensor:
    """Integer hash of int64 values in [0, 2^31): multiply-xorshift rounds whose products stay below 2^58."""
    values = ((values ^ (values >> 16)) * _HASH_MULTIPLIER) & LOW31
    values = ((values ^ (values >> 16)) * _HASH_MULTIPLIER) & LOW31
    return values ^ (values >> 16)


def hash_draws(numel: int, key: Tensor) -> Tensor:
    """Uniform draws in [0, 1) on a 2^-24 grid, a pure function of (entry index, key): counter-based, so they
    fuse into the merge kernel instead of being generated and stored."""
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    mixed = _mix31(_mix31((index + key[0]) & LOW31) ^ key[1])
    return (mixed >> 7).float() * (2.0**-24)


def _all_finite_kernel(tensor: Tensor) -> Tensor:
    return torch.isfinite(tensor).all()


def weight_divisor(weights: Sequence[float], normalize: bool, device: torch.device) -> Tensor:
    """sum(weights) summed in float32 (as mergekit does), or 1 without ``normalize`` or when it is ~0."""
    total = as_vector(weights, device).sum()
    return total if normalize and abs(float(total)) >= 1e-8 else as_scalar(1.0, device)


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity anywhere in ``tensor`` (one fused pass, no temporary mask)."""
    if not tensor.is_floating_point():
        return True
    return bool(run_kernel(_all_finite_kernel, tensor.numel(), flat(tensor)))


BITS_CHUNK = 1 << 21  # entries per pass where a method walks a tensor in chunks (bounded temporaries)

_scratch_buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def scratch(numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A reused buffer per device and dtype: a fresh multi-MB allocation per chunk costs page faults, and on the
    CPU leaves the heap fragmented (resident) long after."""
    buffer = _scratch_buffers.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        _scratch_buffers.pop((device, dtype), None)
        buffer = _scratch_buffers[device, dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]
