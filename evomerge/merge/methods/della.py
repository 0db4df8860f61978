"""DELLA (Deep et al. 2024, DELLA-Merging, arXiv:2406.11617): MAGPRUNE drops each task-vector entry at random
with a keep probability that grows with its magnitude rank in its row, rescales the survivors, then merges the
task vectors by TIES's sign consensus (`della`) or a weighted sum (`della_linear`).

For task vector delta_i = theta_i - base (density d_i < 1, spread eps_i), in each row of delta_i (a 1-D tensor
is one row) the entry of ascending magnitude rank r among n gets keep probability

    p = (d_i - eps_i) + 2 eps_i r / (n - 1)        (from d_i - eps_i for the smallest to d_i + eps_i for the largest)

and kept_i = delta_i * m_i * s_i with m_i ~ Bernoulli(p) and, with ``rescale``, s_i = |delta_i|_1 / |delta_i m_i|_1
(mergekit's L1-norm match `rescaled_masked_tensor`; the paper rescales each survivor by 1/p instead, the same in
expectation), else s_i = 1.  Then ``della``: base + lambda * disjoint_mean(w_i kept_i) (sign election by summed
mass; ``normalize`` divides by the agreeing weights) and ``della_linear``: base + lambda * sum_i w_i kept_i (divided
by sum_i w_i with ``normalize``).  A model with density 1 is kept whole (no ranking, no rescale), as in mergekit.

This is mergekit 0.1.5's `GeneralizedTaskArithmeticMerge` with `sparsify.della_magprune`, with two choices of ours:

* The draws are counter-based (`kernels.hash_draws`, keyed by `sparsify.dare_key(seed, tensor name, model)`) and
  kept when draw < p, so a recipe (with its ``seed``) gives the same masks in any process and on either merge
  path; mergekit's torch.bernoulli masks agree with them only in distribution.  The keep probabilities are
  computed with mergekit's float32 operations, so mergekit fed the same draws keeps the same entries.
* Ranks are those of a stable ascending sort: among entries of equal magnitude in a row the lower index ranks
  lower (mergekit's argsort is unstable there, so a tied entry's probability may differ within the ties' spread).

density +/- epsilon must lie in (0, 1) for mergekit (it raises otherwise).  The search ranges below (density in
[0.25, 0.75], epsilon in [0, 0.2]) keep every decoded point strictly inside; for any other recipe (a hand-written
one, or a search with wider ``search.ranges``) evomerge narrows epsilon to min(epsilon, density, 1 - density), so
the probabilities stay in [0, 1], and the mergekit notes name the groups where mergekit would refuse.  A row of
one entry (n = 1, or a 0-d tensor) gets p = density (mergekit fails there: 0 / 0, or no dimension 1).  Tensors of
more than two dimensions are ranked along dimension 1, as mergekit's ``argsort(dim=1)`` does.

Memory, per tensor of N entries: one bool mask per model with density < 1 (N bytes each: 59 MB per model for a
58.7M-entry 7B MLP matrix), plus, while a mask is drawn, the ranking temporaries of one chunk of whole rows of about
2^20 entries (float32 magnitudes and probabilities, a stable sort's values and int64 indices, int64 ranks, the hash
counters: ~45 bytes an entry, ~50 MB) -- never a full argsort of the tensor (470 MB of int64 indices at 7B, and
mergekit argsorts twice and keeps float32 ranks and probabilities besides).  Measured on the CPU for a 16.8M-entry
bf16 tensor: 57-151 MB peak RSS growth (allocator-dependent), the 17 MB mask included.  Tensors of more than two
dimensions are ranked whole (a permuted copy; none in the usual LLMs).  The final merge is one fused kernel
(`run_kernel`) over the masks and tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import (
    L1_EPS,
    as_scalar,
    as_vector,
    combine,
    flat,
    hash_draws,
    output,
    run_kernel,
    weight_divisor,
)
from evomerge.merge.methods.registry import WEIGHT, Finite, Inputs, Mergekit, PerModel, Value, merge_method
from evomerge.merge.methods.sparsify import dare_key

DELLA_DENSITY = Value(1.0, search=(0.25, 0.75), low=0.0, high=1.0, low_open=True)
"""mergekit's default density (1: nothing dropped); the search range keeps density +/- epsilon inside (0, 1)."""
EPSILON = Value(0.15, search=(0.0, 0.2), low=0.0, high=0.5)
"""The spread of keep probabilities around density (mergekit's default 0.15); above min(d, 1 - d) it is narrowed."""

RANK_CHUNK = 1 << 20  # entries (whole rows) ranked at a time


def effective_epsilon(density: float, epsilon: float) -> float:
    """The spread MAGPRUNE uses: epsilon, narrowed to min(density, 1 - density) so that p stays in [0, 1]."""
    return min(epsilon, density, 1.0 - density)


def mergekit_refuses(density: float, epsilon: float) -> bool:
    """mergekit 0.1.5's della_magprune raises for density < 1 with density +/- epsilon outside (0, 1)."""
    return density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0)


def keep_probabilities(magnitudes: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's keep probability of each entry of a 2-D float32 ``magnitudes`` (rows ranked independently):
    (d - eps) + (r / (n - 1)) * 2 * eps for ascending rank r (stable), in mergekit's float32 operation order."""
    rows, n = magnitudes.shape
    device = magnitudes.device
    if n == 1:
        return torch.full_like(magnitudes, density)
    order = torch.sort(magnitudes, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=device).expand(rows, n))
    del order
    rank_norm = ranks.float().div_(float(n - 1))  # = ((r + 1) - 1) / (n - 1) in float32, as mergekit
    del ranks
    return rank_norm.mul_(2.0).mul_(as_scalar(epsilon, device)).add_(as_scalar(density - epsilon, device))


def _draws(start: int, count: int, key: tuple[int, int], device: torch.device) -> Tensor:
    """Entries start .. start + count of the tensor's `hash_draws` with ``key`` (the counter is offset)."""
    return hash_draws(count, torch.tensor([key[0] + start, key[1]], dtype=torch.int64, device=device))


def _rows(tensor: Tensor) -> tuple[int, int]:
    """(rows, row length) of the ranking view of a tensor of at most two dimensions."""
    if tensor.dim() == 2:
        return tensor.shape[0], tensor.shape[1]
    return 1, tensor.numel()


def della_prune(
    base: Tensor, tensor: Tensor, density: float, epsilon: float, key: tuple[int, int], *, rescale: bool
) -> tuple[Tensor | None, float]:
    """MAGPRUNE of ``tensor - base``: the flat bool mask of kept entries (None: all kept, density >= 1) and the
    survivors' scale (the L1-norm ratio with ``rescale``, else 1)."""
    if density >= 1.0 or base.numel() == 0:
        return None, 1.0
    epsilon = effective_epsilon(density, epsilon)
    device, numel = base.device, base.numel()
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    before = torch.zeros((), dtype=torch.float64, device=device)
    after = torch.zeros((), dtype=torch.float64, device=device)
    if base.dim() > 2:  # ranked along dim 1 (mergekit's argsort(dim=1)): a permuted copy, ranked whole
        magnitudes = (tensor.float() - base.float()).abs()
        moved = magnitudes.movedim(1, -1)
        probabilities = keep_probabilities(moved.reshape(-1, moved.shape[-1]), density, epsilon)
        probabilities = probabilities.reshape(moved.shape).movedim(-1, 1).reshape(-1)
        kept = _draws(0, numel, key, device) < probabilities
        mask.copy_(kept)
        before += magnitudes.sum(dtype=torch.float64)
        after += torch.where(kept, magnitudes.reshape(-1), 0.0).sum(dtype=torch.float64)
    else:
        rows, n = _rows(base)
        base_flat, tensor_flat = flat(base), flat(tensor)
        step = max(1, RANK_CHUNK // n)
        for first in range(0, rows, step):
            start, stop = first * n, min(first + step, rows) * n
            magnitudes = (tensor_flat[start:stop].float() - base_flat[start:stop].float()).abs()
            probabilities = keep_probabilities(magnitudes.view(-1, n), density, epsilon).view(-1)
            kept = torch.lt(_draws(start, stop - start, key, device), probabilities, out=mask[start:stop])
            before += magnitudes.sum(dtype=torch.float64)
            after += torch.where(kept, magnitudes, 0.0).sum(dtype=torch.float64)
    if not rescale:
        return mask, 1.0
    before, after = float(before), float(after)
    return mask, before / after if before >= L1_EPS and after >= L1_EPS else 1.0


def _della_kernel(
    out: Tensor,
    base: Tensor,
    tensors: list[Tensor],
    masks: list[Tensor],
    factors: Tensor,
    weights: Tensor,
    divisor: Tensor,
    scale: Tensor,
    consensus: bool,
    normalize: bool,
) -> Tensor:
    base32 = base.float()
    weighted = []
    for index, tensor in enumerate(tensors):
        delta = tensor.float() - base32
        weighted.append(torch.where(masks[index], delta * factors[index], 0.0) * weights[index])
    out.copy_(base32 + combine(weighted, weights, divisor, consensus, normalize) * scale)
    return out


def della(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    keys: Sequence[tuple[int, int]],
    *,
    consensus: bool,
    scale: float = 1.0,
    normalize: bool,
    rescale: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """MAGPRUNE each task vector (`della_prune`, draws keyed by ``keys``) and weight it; then, with ``consensus``
    (della), TIES sign consensus: base + scale * disjoint_mean(w_i s_i m_i (theta_i - base)); else (della_linear)
    base + scale * sum(w_i s_i m_i (theta_i - base)), divided by sum(w_i) with ``normalize``."""
    out = output(out, base)
    device = out.device
    masks, factors = [], []
    everything = torch.ones(1, dtype=torch.bool, device=device).expand(base.numel())
    for tensor, density, epsilon, key in zip(tensors, densities, epsilons, keys):
        mask, factor = della_prune(base, tensor, density, epsilon, key, rescale=rescale)
        masks.append(everything if mask is None else mask)
        factors.append(factor)
    run_kernel(
        _della_kernel,
        out.numel(),
        flat(out),
        flat(base),
        [flat(tensor) for tensor in tensors],
        masks,
        as_vector(factors, device),
        as_vector(weights, device),
        weight_divisor(weights, normalize, device),
        as_scalar(scale, device),
        consensus,
        normalize,
    )
    return out


def _options(options: dict[str, Any]) -> dict[str, Any]:
    # mergekit's names; its masks have no seed
    return {"lambda": options["lambda"], "normalize": options["normalize"], "rescale": options["rescale"]}


def _notes(recipe: Any, half: Sequence[str]) -> list[str]:
    notes = ["DELLA drop masks differ: evomerge draws them from a hash of (seed, tensor, model), mergekit from "
             "torch.bernoulli with the same keep probabilities, so the two models agree only in distribution"]
    if half:
        notes.append(f"{half[0]} task vectors tie a lot: among entries of equal magnitude in a row evomerge ranks "
                     "the lower index lower, mergekit's unstable argsort in any order, so their keep probabilities "
                     "may differ (within the ties' share of the 2 * epsilon spread)")
    refused = sorted({group.name for group in recipe.groups
                      for density, epsilon in zip(group["density"], group["epsilon"])
                      if mergekit_refuses(density, epsilon)})
    if refused:
        notes.append(f"in group(s) {refused} density +/- epsilon leaves (0, 1): mergekit refuses this config, "
                     "evomerge narrows epsilon there to min(density, 1 - density)")
    return notes


def _della_merge(consensus: bool, normalize_default: bool):
    def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, density: PerModel = DELLA_DENSITY,
              epsilon: PerModel = EPSILON, lambda_: Finite = 1.0, normalize: bool = normalize_default,
              rescale: bool = True, seed: Annotated[int, Field(ge=0)] = 0) -> Tensor:
        keys = [dare_key(seed, inputs.name, index) for index in range(len(inputs.tensors))]
        return della(inputs.base, inputs.tensors, weight, density, epsilon, keys, consensus=consensus,
                      scale=lambda_, normalize=normalize, rescale=rescale, out=inputs.out)
    return merge


PAPER = "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling " \
        "(arXiv:2406.11617)"
merge_method("della", paper=PAPER, mergekit=Mergekit("della", _options, _notes))(
    _della_merge(consensus=True, normalize_default=True))
merge_method("della_linear", paper=PAPER, mergekit=Mergekit("della_linear", _options, _notes))(
    _della_merge(consensus=False, normalize_default=False))
