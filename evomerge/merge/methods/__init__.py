"""Merge methods: one module per method (its pure tensor function, its values and their ranges, its mergekit
mapping), registered in `registry.METHODS` by the `registry.merge_method` decorator.

Adding a method = one module in this package (every module but the shared `kernels`, `sparsify` and
`registry` is imported, so its decorator registers it), plus ``conf/merge/<name>.yaml`` and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from evomerge.merge.methods.kernels import all_finite, output
from evomerge.merge.methods.registry import METHODS, Inputs, MergeMethod, method
from evomerge.merge.methods.sparsify import MagnitudeTable

if TYPE_CHECKING:
    from evomerge.recipe import GroupValues, PSRecipe

__all__ = ["METHODS", "MergeMethod", "all_finite", "merge_tensor", "method"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("kernels", "sparsify", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")


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

    ``magnitude_tables`` (prepared once by the in-memory merger, one per model) spare TIES its counting pass; the
    result is the same without them.  ``statistics`` maps tensor names to per-model Fisher diagonals or Gram
    matrices (on any device: they are used on the tensors'); the method decides what to do without them.
    Integer tensors (e.g. position ids) are copied from the base, or the first model.
    """
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():
        out = output(out, reference)
        out.copy_(reference)
        return out
    inputs = Inputs(name, base, tensors, out, magnitude_tables, statistics.get(name) if statistics else None)
    return METHODS[recipe.method](inputs, group.values, recipe.parameters)
