"""Merge engine: pure merge methods, layer groups, a disk->disk merger and an in-memory candidate merger.

The search calls `InMemoryMerger.merge` thousands of times; `merge_to_disk` writes a recipe's final model.
Both run the same per-tensor math (`methods.merge_tensor`) on a chosen device (`device="cuda"`: every tensor
a method or statistic uses is moved there), so a candidate equals its disk twin bit for bit on the same device.
Submodules are imported lazily so that `evomerge.recipe` can use `MergeError` without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any


class MergeError(ValueError):
    """A recipe cannot be applied to its checkpoints; the message names the model and tensor at fault."""


_LAZY = {
    "InMemoryMerger": "evomerge.merge.memory",
    "merge_to_disk": "evomerge.merge.stream",
    "block_ranges": "evomerge.merge.groups",
    "group_names": "evomerge.merge.groups",
}

__all__ = ["MergeError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
