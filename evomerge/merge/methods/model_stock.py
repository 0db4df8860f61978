"""Model Stock (Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522).

With the base w_0 and N >= 2 fine-tunes w_1..w_N, per tensor (or, ``filter_wise``, per row: per vector along the
last dimension; a 1-D tensor is one row):

    cos = mean over pairs i < j of clamp(<w_i - w_0, w_j - w_0> / max(|w_i - w_0| |w_j - w_0|, 1e-6), -1, 1)
    t   = N cos / (1 + (N - 1) cos)          (t = 0 where |1 + (N - 1) cos| < 1e-6: the base kept)
    w   = t * (w_1 + ... + w_N) / N + (1 - t) * w_0

The method derives its own interpolation ratio t, so a recipe has no per-model or per-layer-group values to set
or search; it is usable by `evomerge merge`, as a recipe and as a baseline, and a search refuses it.

This is mergekit 0.1.5's ``model_stock`` (mergekit/merge_methods/model_stock.py): the cosines, their mean and t
are computed by the same float32 torch operations, and the average and the interpolation in the same float32
order; only the norms and dot products are summed in float64 (mergekit: float32), so t can differ from
mergekit's in its last bits.

Memory: no temporary of the tensor's size (with or without torch.compile).  The norms and dot products
(N + N(N-1)/2 float64 sums per row: 48 bytes a row for three models) are accumulated `BITS_CHUNK` entries (or
whole rows) at a time, then the interpolation runs over the same chunks: two passes over the inputs.  mergekit
holds the N offsets and the average in float32 besides its inputs (N + 1 float32 copies of the tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods.kernels import BITS_CHUNK, flat, output, run_kernel
from evomerge.merge.methods.registry import Inputs, Mergekit, merge_method


def _gram_kernel(base: Tensor, tensors: list[Tensor]) -> Tensor:
    """Per row of 2-D inputs: each offset's squared norm, then each pair's dot product (i < j), in float64."""
    base32 = base.float()
    offsets = [(tensor.float() - base32).double() for tensor in tensors]
    sums = [offset.square().sum(-1) for offset in offsets]
    for index, first in enumerate(offsets):
        sums += [(first * second).sum(-1) for second in offsets[index + 1:]]
    return torch.stack(sums, dim=-1)


def _stock_kernel(out: Tensor, base: Tensor, tensors: list[Tensor], t: Tensor) -> Tensor:
    # mergekit: sum(ws) / count, then t * average + (1 - t) * w_0, all in float32
    average = tensors[0].float()
    for tensor in tensors[1:]:
        average = average + tensor.float()
    average = average / len(tensors)
    out.copy_(t * average + (1 - t) * base.float())
    return out


def _rows(tensor: Tensor, filter_wise: bool) -> tuple[int, int]:
    """The (rows, columns) over which the angles are measured: one row, or a row per last-dimension vector."""
    if filter_wise and tensor.dim() >= 2 and tensor.shape[-1]:
        return tensor.numel() // tensor.shape[-1], tensor.shape[-1]
    return 1, tensor.numel()


def _gram(base: Tensor, tensors: Sequence[Tensor], rows: int, columns: int) -> Tensor:
    """The per-row norms and dot products of the offsets, (rows, N + N(N-1)/2) float64, in bounded chunks."""
    if rows == 1:  # one row: sum chunk by chunk
        base, tensors = flat(base), [flat(tensor) for tensor in tensors]
        total = None
        for start in range(0, columns, BITS_CHUNK):
            stop = min(start + BITS_CHUNK, columns)
            sums = run_kernel(_gram_kernel, stop - start, base[start:stop].reshape(1, -1),
                              [tensor[start:stop].reshape(1, -1) for tensor in tensors])
            total = sums if total is None else total + sums
        return total
    base, tensors = base.reshape(rows, columns), [tensor.reshape(rows, columns) for tensor in tensors]
    step = max(1, BITS_CHUNK // columns)
    return torch.cat([run_kernel(_gram_kernel, min(step, rows - start) * columns, base[start:start + step],
                                 [tensor[start:start + step] for tensor in tensors])
                      for start in range(0, rows, step)])


def interpolation_ratio(gram: Tensor, count: int) -> Tensor:
    """Model Stock's t per row (float32, shape (rows, 1)) from the offsets' norms and dot products, by
    mergekit's float32 operations."""
    norms = gram[:, :count].sqrt().float()
    cosines, column = [], count
    for first in range(count):
        for second in range(first + 1, count):
            norm_product = norms[:, first] * norms[:, second]
            cosines.append((gram[:, column].float() / norm_product.clamp(min=1e-6)).clamp(-1, 1))
            column += 1
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False,
                out: Tensor | None = None) -> Tensor:
    """Model Stock merge of one tensor (see the module docstring); ``filter_wise``: one ratio per row."""
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    out = output(out, base)
    if base.numel() == 0:
        return out
    rows, columns = _rows(base, filter_wise)
    t = interpolation_ratio(_gram(base, tensors, rows, columns), len(tensors))
    if rows == 1:  # chunks of entries, one ratio
        pieces = [(slice(0, 1), slice(start, start + BITS_CHUNK)) for start in range(0, columns, BITS_CHUNK)]
    else:  # chunks of rows, a ratio per row
        step = max(1, BITS_CHUNK // columns)
        pieces = [(slice(start, start + step), slice(None)) for start in range(0, rows, step)]
    grid = [tensor.reshape(rows, columns) for tensor in (out, base, *tensors)]
    for row_range, column_range in pieces:
        out_piece, base_piece, *pieces_of_models = (tensor[row_range, column_range] for tensor in grid)
        run_kernel(_stock_kernel, out_piece.numel(), out_piece, base_piece, pieces_of_models, t[row_range])
    return out


@merge_method("model_stock", n_models=(2, None),
              paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
              mergekit=Mergekit("model_stock"))
def merge(inputs: Inputs, *, filter_wise: bool = False) -> Tensor:
    return model_stock(inputs.base, inputs.tensors, filter_wise=filter_wise, out=inputs.out)
