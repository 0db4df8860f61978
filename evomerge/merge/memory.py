"""In-memory candidate merging for the search: prepare once, then each candidate is one pass per tensor
written straight into a resident model's parameters (no new model, no disk I/O).

Prepared once, all on the merger's device: the resident model (loaded first, while little else is in memory),
then every input tensor in its checkpoint dtype (validated like the disk path), and -- lazily, the first time
a recipe needs them -- a `MagnitudeTable` per task-vector tensor for TIES (its distinct magnitudes and their
counts, on the CPU: a trim at any density becomes a lookup plus, where only some tied entries are kept, a count
over one run of 2^18 entries) and the Fisher / Gram statistics of data-aware recipes.  DARE draws are a hash
of the entry index, computed inside the merge kernel, so they need no storage.  Candidates run
`methods.merge_tensor` exactly as `merge_to_disk` does, so a candidate's tensors equal the disk result's bit for
bit when the resident model has the checkpoint dtype (the default) and both run on the same device.

Memory (scripts/bench_merge.py, bf16 pools, base + 3 models): the pool in its own dtype (2 bytes a parameter
per model), one resident candidate (2 bytes a parameter), the magnitude tables (8 bytes per distinct magnitude:
23-26 MB for 3 x 200M or 3 x 1B task vectors, ~0.01-0.03 byte a pool parameter) and a few MB of per-chunk
temporaries; no float32 copy of the pool, no sorted magnitudes.  Measured, the merger's own peak (peak RSS
minus the process's ~0.5 GB of imports and compiled kernels) is 1.07x pool + candidate at 200M parameters a model
and 1.045x at 1B (2.6-2.7 bytes a pool parameter; the sorted-magnitude merger it replaces took 7.7).
Base + 3 x 7.24B in bf16: pool 4 x 14.5 GB = 57.9 GB + candidate 14.5 GB = 72.4 GB, + ~1.05x and the 0.5 GB
process = ~76 GB of host memory for device="cpu".  With device="cuda" the same ~73-74 GB (plus the CUDA context)
sits on the GPU and the host holds the tables and, while loading, one model (~15-30 GB).  Fisher statistics
add 4 bytes a parameter per model (float32), RegMean Gram matrices in x in floats per linear layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from evomerge.errors import MergeError
from evomerge.merge.methods import all_finite, merge_tensor
from evomerge.merge.methods.sparsify import MagnitudeTable, magnitude_table
from evomerge.merge.stream import check_recipe_fits, needed_statistics, open_inputs
from evomerge.modelio import load_model, resolve_dtype
from evomerge.recipe import PSRecipe


def _same_checkpoint(first: str | Path, second: str | Path) -> bool:
    return Path(first).resolve() == Path(second).resolve()


class InMemoryMerger:
    """Merges recipes over a fixed pool (``base`` + ``models``) into one resident model.

    A recipe may use any of the pool's models, in any order; its base must be the pool's base.
    ``statistics`` maps a kind ("fisher", "gram") to tensor name -> one statistic per pool model, for Fisher
    and RegMean recipes; kinds it lacks are loaded or computed from the recipe's prompts (and kept).
    ``device`` holds the pool and the resident model (e.g. "cuda": candidates merge on the GPU they run on).
    ``dtype`` is the one the pool and the resident model are held in (None: the checkpoints' own), so a search
    at dtype=bfloat16 over float32 checkpoints merges and scores what a bf16 user gets, in half the memory.
    """

    def __init__(
        self,
        base: str | Path | None,
        models: Sequence[str | Path],
        *,
        model: PreTrainedModel | None = None,
        statistics: Mapping[str, Mapping[str, Sequence[Tensor]]] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ):
        self.base = None if base is None else str(base)
        self.models = [str(path) for path in models]
        self.device = torch.device(device)
        inputs = open_inputs(self.base, self.models)
        try:
            self.names = inputs.names
            self.dtype = self._reference_dtype(inputs) if dtype is None else resolve_dtype(dtype)
            if model is None:  # before the pool: loading briefly needs a second copy of the model
                model = load_model(inputs.paths[0], dtype=self.dtype, device=str(self.device))
            self.model = model
            stacked = {name: [self._held(tensor) for tensor in inputs.read_checked(name)] for name in self.names}
        finally:
            inputs.close()
        offset = 1 if self.base is not None else 0
        self._base = {name: tensors[0] for name, tensors in stacked.items()} if offset else None
        self._pool = [{name: tensors[index + offset] for name, tensors in stacked.items()} for index in range(len(self.models))]
        self._targets = self._find_targets()
        self._statistics: dict[tuple, Mapping[str, Sequence[Tensor]]] = {
            (kind,): self._on_device(values) for kind, values in (statistics or {}).items()
        }
        self._tables: dict[str, list[MagnitudeTable]] = {}
        self._assignments: dict[tuple[str, ...], dict[str, int]] = {}

    def _held(self, tensor: Tensor) -> Tensor:
        """A checkpoint tensor as the pool holds it: on the merger's device, floats in the merger's dtype."""
        return tensor.to(self.device, self.dtype if tensor.is_floating_point() else None)

    @staticmethod
    def _reference_dtype(inputs) -> torch.dtype:
        floating = [entry.dtype for entry in inputs.reference.entries.values() if entry.dtype.is_floating_point]
        return max(set(floating), key=floating.count) if floating else torch.float32

    def _on_device(self, statistics: Mapping[str, Sequence[Tensor]]) -> dict[str, list[Tensor]]:
        return {name: [value.to(self.device) for value in per_model] for name, per_model in statistics.items()}

    def _find_targets(self) -> dict[str, Tensor]:
        """The resident model's tensor for each checkpoint tensor (tied weights share one)."""
        resident = dict(self.model.named_parameters(remove_duplicate=False))
        resident.update(self.model.named_buffers(remove_duplicate=False))
        targets = {}
        for name in self.names:
            if name not in resident:
                raise MergeError(f"resident model has no tensor {name!r} from checkpoint {self.base or self.models[0]}")
            if tuple(resident[name].shape) != tuple(self._reference(name).shape):
                raise MergeError(f"resident model's {name!r} has shape {list(resident[name].shape)}, checkpoint has "
                                 f"{list(self._reference(name).shape)}")
            targets[name] = resident[name].data
        return targets

    def _reference(self, name: str) -> Tensor:
        return self._base[name] if self._base is not None else self._pool[0][name]

    def _pool_indices(self, recipe: PSRecipe) -> list[int]:
        if recipe.base is not None and (self.base is None or not _same_checkpoint(recipe.base, self.base)):
            raise MergeError(f"recipe {recipe.hash} has base {recipe.base}, this merger was prepared for {self.base}")
        indices = []
        for model in recipe.models:
            matches = [index for index, pooled in enumerate(self.models) if _same_checkpoint(model, pooled)]
            if not matches:
                raise MergeError(f"recipe {recipe.hash} uses model {model}, which is not in this merger's pool {self.models}")
            indices.append(matches[0])
        return indices

    def _magnitude_tables(self, name: str) -> list[MagnitudeTable]:
        if name not in self._tables:
            assert self._base is not None
            self._tables[name] = [magnitude_table(self._base[name], pool[name]) for pool in self._pool]
        return self._tables[name]

    def _pool_statistics(self, recipe: PSRecipe, indices: Sequence[int]) -> Mapping[str, Sequence[Tensor]] | None:
        kind = recipe.spec.statistics
        if kind is None:
            return None
        options = recipe.parameters
        key = (kind,) if (kind,) in self._statistics else (kind, options["prompts"], options["max_prompts"])
        if key not in self._statistics:
            pool_recipe = PSRecipe.uniform(recipe.method, None, self.models, parameters=dict(options))
            self._statistics[key] = self._on_device(needed_statistics(pool_recipe, device=self.device) or {})
        pooled = self._statistics[key]
        return {name: [per_model[index] for index in indices] for name, per_model in pooled.items()}

    def prepare(self, recipe: PSRecipe) -> None:
        """Do the one-off work ``recipe``'s method needs now rather than on the first candidate."""
        indices = self._pool_indices(recipe)
        for name in self.names:
            if recipe.spec.magnitude_tables and self._targets[name].is_floating_point():
                self._magnitude_tables(name)
        self._pool_statistics(recipe, indices)

    def source(self, path: str | Path) -> PreTrainedModel:
        """The resident model holding one pool checkpoint (the base or a model) as it is: what `load_model(path,
        dtype, device)` gives, from the resident pool instead of a second copy of the model in memory."""
        if self._base is not None and _same_checkpoint(path, self.base):
            tensors = self._base
        else:
            matches = [pool for pooled, pool in zip(self.models, self._pool) if _same_checkpoint(path, pooled)]
            if not matches:
                raise MergeError(f"{path} is not in this merger's pool {[self.base, *self.models]}")
            tensors = matches[0]
        with torch.no_grad():
            for name, target in self._targets.items():
                target.copy_(tensors[name])
        return self.model

    def merge(self, recipe: PSRecipe) -> PreTrainedModel:
        """Write ``recipe``'s merged weights into the resident model and return it."""
        indices = self._pool_indices(recipe)
        key = recipe.group_names
        if key not in self._assignments:
            self._assignments[key] = check_recipe_fits(recipe, self.names)
        assignment = self._assignments[key]
        statistics = self._pool_statistics(recipe, indices)
        with torch.no_grad():
            for name in self.names:
                tensors = [self._pool[index][name] for index in indices]
                target = self._targets[name]
                tables = None
                if recipe.spec.magnitude_tables and target.is_floating_point():
                    tables = [self._magnitude_tables(name)[index] for index in indices]
                base = self._base[name] if self._base is not None and recipe.base is not None else None
                merge_tensor(recipe, recipe.groups[assignment[name]], name, base, tensors, out=target,
                             magnitude_tables=tables, statistics=statistics)
                if not all_finite(target):  # e.g. huge weights overflowing: the candidate fails, not the search
                    raise MergeError(f"recipe {recipe.hash}: merged tensor {name!r} has NaN or infinite values")
        return self.model
