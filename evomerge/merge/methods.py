"""Merge methods as pure tensor functions, plus the thin per-tensor dispatch both merge paths share.

Every function takes the tensors of one parameter (base and/or one per model), computes in float32 and
returns the result in the checkpoint dtype (``out``'s dtype when given, written in place).  No I/O, no models.

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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
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


def _as_vector(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32)


def _as_scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


# --------------------------------------------------------------------------- kernels
# Each kernel reads its inputs once and writes ``out`` once; torch.compile fuses everything in between.


def _weighted_sum_kernel(out: Tensor, tensors: list[Tensor], weights: Tensor, divisor: Tensor) -> Tensor:
    total = tensors[0].float() * weights[0]
    for index in range(1, len(tensors)):
        total = total + tensors[index].float() * weights[index]
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
    scale: Tensor,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        weighted.append(torch.where(delta.abs() >= thresholds[index], delta * weights[index], 0.0))
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


def _weight_divisor(weights: Sequence[float], normalize: bool) -> Tensor:
    total = sum(weights)
    return _as_scalar(total if normalize and abs(total) >= 1e-8 else 1.0)


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Weighted average sum(w_i * theta_i) / sum(w_i); without ``normalize`` the plain weighted sum."""
    out = _output(out, tensors[0])
    _run_kernel(
        _weighted_sum_kernel,
        out.numel(),
        _flat(out),
        [_flat(tensor) for tensor in tensors],
        _as_vector(weights),
        _weight_divisor(weights, normalize),
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
        _as_vector(weights),
        _weight_divisor(weights, normalize),
        _as_scalar(scale),
    )
    return out


def keep_count(numel: int, density: float) -> int:
    """How many entries a top-``density`` trim keeps: at least one, as in mergekit."""
    return max(1, int(density * numel))


_scratch_buffers: dict[torch.device, Tensor] = {}


def _scratch(numel: int, device: torch.device) -> Tensor:
    """A reused float32 buffer per device: a fresh multi-MB allocation per tensor and model costs page faults."""
    buffer = _scratch_buffers.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch_buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]


def trim_threshold(base: Tensor, tensor: Tensor, density: float) -> float:
    """Smallest |tensor - base| a top-``density`` trim keeps (the exact k-th largest magnitude), so the trim
    is one comparison, |delta| >= threshold.

    For big tensors a sorted random sample brackets the answer; numpy counts the entries below the bracket
    and cuts out the ~2% inside it, where ``np.partition`` finds the exact value (~10x faster than
    ``torch.kthvalue`` on the whole tensor).
    """
    numel = base.numel()
    if numel == 0:
        return 0.0
    magnitudes = _run_kernel(_abs_delta_kernel, numel, _scratch(numel, base.device), _flat(base), _flat(tensor))
    magnitudes = magnitudes.cpu().numpy()  # the selection runs in numpy (on the CPU this is the buffer itself)
    rank = numel - keep_count(numel, density)  # 0-based position in ascending order
    sample_size = 1 << 16
    if numel > 4 * sample_size:
        generator = torch.Generator().manual_seed(numel)
        sample = np.sort(magnitudes[torch.randint(numel, (sample_size,), generator=generator).numpy()])
        fraction = rank / numel
        low = sample[max(0, math.floor((fraction - 0.01) * sample_size))]
        high = sample[min(sample_size - 1, math.ceil((fraction + 0.01) * sample_size))]
        below = int(np.count_nonzero(magnitudes < low))
        window = magnitudes[(magnitudes >= low) & (magnitudes <= high)]
        if 0 <= rank - below < window.size:
            return float(np.partition(window, rank - below)[rank - below])
    return float(np.partition(magnitudes, rank)[rank])


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity anywhere in ``tensor`` (one fused pass, no temporary mask)."""
    if not tensor.is_floating_point():
        return True
    return bool(_run_kernel(_all_finite_kernel, tensor.numel(), _flat(tensor)))


def sorted_magnitudes(delta: Tensor) -> Tensor:
    """|delta| sorted ascending, prepared once so `threshold_from_sorted` trims at any density for free."""
    return torch.from_numpy(_flat(delta).float().abs().cpu().numpy().copy()).sort().values  # kept on the CPU


def threshold_from_sorted(sorted_values: Tensor, density: float) -> float:
    """Same value as `trim_threshold` on the unsorted task vector, by indexing."""
    numel = sorted_values.numel()
    if numel == 0:
        return 0.0
    return float(sorted_values[numel - keep_count(numel, density)])


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    scale: float = 1.0,
    normalize: bool = True,
    thresholds: Sequence[float] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, weight it, elect a sign per element by
    summed mass, and average (``normalize``: divide by the summed weights of) the entries that agree.

    ``thresholds`` (from `threshold_from_sorted`) skips the trim's selection step; the result is the same.
    """
    if thresholds is None:
        thresholds = [trim_threshold(base, tensor, density) for tensor, density in zip(tensors, densities)]
    out = _output(out, base)
    _run_kernel(
        _ties_kernel,
        out.numel(),
        _flat(out),
        _flat(base),
        [_flat(tensor) for tensor in tensors],
        _as_vector(weights),
        _as_vector(thresholds),
        _as_scalar(scale),
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
            _dare_l1_kernel, base.numel(), _flat(base), _flat(tensor), keys[index], _as_scalar(density)
        ).tolist()
        factors.append(before / after if before > 1e-7 and after > 1e-7 else 1.0)
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
        _as_vector(weights),
        _as_vector(densities),
        _as_vector(_dare_rescales(base, tensors, key_table, densities, rescale)),
        _weight_divisor(weights, normalize),
        _as_scalar(scale),
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


def slerp(t: float, first: Tensor, second: Tensor, *, out: Tensor | None = None, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation from ``first`` (t=0) to ``second`` (t=1) along the great circle through the
    directions of the two whole tensors; nearly (anti)parallel tensors fall back to linear interpolation."""
    a = _flat(first).float()
    b = _flat(second).float()
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if norm_a < 1e-8 or norm_b < 1e-8:
        coefficients = (1.0 - t, t)
    else:
        cosine = min(1.0, max(-1.0, float(torch.dot(a.double(), b.double())) / (norm_a * norm_b)))
        if abs(cosine) > dot_threshold:
            coefficients = (1.0 - t, t)
        else:
            angle = math.acos(cosine)
            coefficients = (math.sin((1.0 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle))
    out = _output(out, first)
    _run_kernel(_blend_kernel, out.numel(), _flat(out), a, b, _as_vector(coefficients))
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
    ``floor`` so entries no prompt touched fall back to the weighted average."""
    out = _output(out, tensors[0])
    _run_kernel(
        _fisher_kernel,
        out.numel(),
        _flat(out),
        [_flat(tensor) for tensor in tensors],
        [_flat(values) for values in fishers],
        _as_vector(weights),
        _as_scalar(floor),
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
    sum_i w_i ||X_i W^T - X_i W_i^T||^2 plus the shrink's ridge."""
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros((grams[0].shape[0], tensors[0].shape[0]), dtype=torch.float64)
    for tensor, gram, weight in zip(tensors, grams, weights):
        shrunk = shrink_gram(gram, alpha).double() * weight
        lhs += shrunk
        rhs += shrunk @ tensor.double().T
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:  # inputs never reached some features: least squares picks the minimum norm
        solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
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
    sorted_magnitudes: Sequence[Tensor] | None = None,
    statistics: Mapping[str, Sequence[Tensor]] | None = None,
) -> Tensor:
    """Merge one named tensor the way ``recipe`` says for the layer ``group`` it belongs to.

    ``sorted_magnitudes`` (prepared once by the in-memory merger) gives TIES its trim thresholds by lookup;
    without it the same thresholds are computed here.  ``statistics`` maps tensor names to per-model Fisher
    diagonals or Gram matrices; tensors it lacks are weight-averaged.
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
        thresholds = None
        if sorted_magnitudes is not None:
            thresholds = [threshold_from_sorted(values, d) for values, d in zip(sorted_magnitudes, densities)]
        return ties(base, tensors, weights, densities, scale=options["lambda"], normalize=options["normalize"],
                    thresholds=thresholds, out=out)
    keys = [dare_key(options["seed"], name, index) for index in range(len(tensors))]
    dare = dare_ties if method == "dare_ties" else dare_linear
    return dare(base, tensors, weights, densities, keys, scale=options["lambda"],
                normalize=options["normalize"], rescale=options["rescale"], out=out)
