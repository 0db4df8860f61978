"""RegMean (Jin et al. 2023, arXiv:2212.09849): each linear layer merged in closed form from its inputs' Gram
matrices (`evomerge.merge.statistics`); other tensors are weight-averaged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from evomerge.merge.methods.kernels import output
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.fisher import _notes, _options
from evomerge.merge.methods.registry import WEIGHT, Inputs, merge_method, Mergekit, PerModel


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
    out = output(out, tensors[0])
    out.copy_(solution.T)
    return out



@merge_method("regmean", base="none", statistics="gram", mergekit=Mergekit(None, _options, _notes),
              paper="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models (arXiv:2212.09849)")
def merge(inputs: Inputs, *, weight: PerModel = WEIGHT, alpha: Annotated[float, Field(ge=0, le=1)] = 0.9,
          prompts: str | None = None, max_prompts: Annotated[int, Field(ge=1)] = 64,
          statistics_dir: str | None = None) -> Tensor:
    if inputs.statistics is None or inputs.tensors[0].dim() != 2:
        return linear(inputs.tensors, weight, normalize=True, out=inputs.out)
    return regmean(inputs.tensors, inputs.statistics, weight, alpha=alpha, out=inputs.out)
