"""Genomes: a point in the unit box [0, 1]^D decodes to a recipe; this module owns what each coordinate means.

Parameter space (`PSGenomeSpace` -> `PSRecipe`): coordinates run group by group, and within a group model by
model, through the method's per-model values (weight, then density), so `describe()` names every dimension.
Data-flow space (`DFSGenomeSpace` -> `DFSRecipe`): T slot indicators (0 or 1), then the M x M scaling matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import MergeError
from evomerge.merge.methods import method
from evomerge.recipe import DFSRecipe, GroupValues, PSRecipe


@dataclass(frozen=True)
class PSGenomeSpace:
    """Which values a genome sets (method's per-model and per-group values, per layer group) and their ranges."""

    method: str
    base: str | None
    models: tuple[str, ...]
    groups: tuple[str, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    shared: bool = False  # one set of values for every group (the coarsest granularity)
    ranges: Mapping[str, tuple[float, float] | None] = field(default_factory=dict)  # overrides of the method's

    def __post_init__(self) -> None:
        spec = method(self.method)
        for key, value in spec.values.items():
            low, high = self.range(key)
            if not low <= high:
                raise MergeError(f"search range for {key!r} is empty: [{low}, {high}]")
            if not (value.contains(low) and value.contains(high)):
                raise MergeError(f"search range for {key} must lie in {value.bounds()}, got [{low}, {high}]")
        if self.dim == 0:
            raise MergeError(f"{self.method} has no values to search (nothing per model or per layer group); "
                             "use it as a baseline, or search a method that has")
        # validate once: the recipe at the box's centre must be a valid recipe
        self.decode(np.full(self.dim, 0.5))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(method(self.method).values)

    def range(self, key: str) -> tuple[float, float]:
        """What the unit box maps to for ``key``: ``search.ranges.<key>`` when set, else the method's own range."""
        override = self.ranges.get(key)
        return tuple(override) if override is not None else method(self.method).values[key].search

    @property
    def dim(self) -> int:
        spec = method(self.method)
        return self._coded_groups * (len(spec.per_model) * len(self.models) + len(spec.per_group))

    @property
    def _coded_groups(self) -> int:
        return 1 if self.shared else len(self.groups)

    def describe(self) -> list[str]:
        """One name per genome coordinate, e.g. `blocks.0-1/density/1`."""
        spec = method(self.method)
        names = []
        for group in ("all",) if self.shared else self.groups:
            for key in spec.per_model:
                names += [f"{group}/{key}/{index}" for index in range(len(self.models))]
            names += [f"{group}/{key}" for key in spec.per_group]
        return names

    def decode(self, genome: Sequence[float]) -> PSRecipe:
        """Map unit-box coordinates linearly onto each value's range (clipped, so any vector decodes)."""
        x = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if x.shape != (self.dim,):
            raise MergeError(f"genome has shape {x.shape}, this space has {self.dim} dimensions")
        spec = method(self.method)
        values = iter(x.tolist())
        entries = []
        for _ in range(self._coded_groups):
            entry: dict[str, Any] = {}
            for key in spec.per_model:
                entry[key] = tuple(self._scale(key, next(values)) for _ in self.models)
            for key in spec.per_group:
                entry[key] = self._scale(key, next(values))
            entries.append(entry)
        if self.shared:
            entries = entries * len(self.groups)
        groups = [GroupValues(name, entry) for name, entry in zip(self.groups, entries)]
        return PSRecipe(self.method, self.models, tuple(groups), self.base, dict(self.parameters))

    def encode(self, values: Mapping[str, float]) -> np.ndarray:
        """The genome whose every coordinate of key k decodes to values[k] (clipped into the box): the
        recipe a search starts from, e.g. the method's default weight and density."""
        spec = method(self.method)
        units = []
        for key in spec.values:
            low, high = self.range(key)
            unit = 0.5 if high == low else (float(values[key]) - low) / (high - low)
            units.append((key, min(1.0, max(0.0, unit))))
        per_group = []
        for key, unit in units:
            per_group += [unit] * (len(self.models) if key in spec.per_model else 1)
        return np.asarray(per_group * self._coded_groups)

    def _scale(self, key: str, unit: float) -> float:
        low, high = self.range(key)
        return round(low + unit * (high - low), 6)  # 6 digits: short YAML, stable hashes


@dataclass(frozen=True)
class DFSGenomeSpace:
    """Layer paths over `models` (with `layers` blocks each): T = M x `repeats` indicator coordinates
    (>= 0.5 includes the slot), then M x M scale coordinates mapped linearly onto `scale_range`."""

    models: tuple[str, ...]
    layers: tuple[int, ...]
    repeats: int
    embed_from: int = 0
    scale_range: tuple[float, float] = (0.0, 2.0)

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not low <= 1.0 <= high:
            raise MergeError(f"search.scale_range [{low}, {high}] must contain 1 (a block's input unchanged)")
        self.decode(np.full(self.dim, 0.5))  # validates models, layers, repeats and embed_from once

    @property
    def blocks(self) -> int:
        return sum(self.layers)

    @property
    def slots(self) -> int:
        return self.blocks * self.repeats

    @property
    def dim(self) -> int:
        return self.slots + self.blocks**2

    def describe(self) -> list[str]:
        return [f"include/{t}" for t in range(self.slots)] + [
            f"scale/{i}/{j}" for i in range(self.blocks) for j in range(self.blocks)
        ]

    def decode(self, genome: Sequence[float]) -> DFSRecipe:
        x = np.asarray(genome, dtype=float)
        if x.shape != (self.dim,):
            raise MergeError(f"genome has shape {x.shape}, this space has {self.dim} dimensions")
        low, high = self.scale_range
        units = np.clip(x[self.slots:], 0.0, 1.0).reshape(self.blocks, self.blocks)
        scales = tuple(tuple(round(low + u * (high - low), 6) for u in row) for row in units.tolist())
        include = tuple(bool(v >= 0.5) for v in x[: self.slots].tolist())
        return DFSRecipe(self.models, self.layers, self.repeats, include, scales, self.embed_from)

    def unit_scale(self) -> float:
        return float(self.to_unit(np.array(1.0)))

    def to_unit(self, scales: np.ndarray) -> np.ndarray:
        """The box coordinates that decode to `scales` (clipped into `scale_range`; 0.5 when it is a point)."""
        low, high = self.scale_range
        return np.full(np.shape(scales), 0.5) if high == low else np.clip((scales - low) / (high - low), 0.0, 1.0)

    def model_path(self, model: int) -> np.ndarray:
        """The genome of `model` on its own: its blocks in order in the first repeat, every scale 1."""
        genome = np.concatenate([np.zeros(self.slots), np.full(self.blocks**2, self.unit_scale())])
        start = sum(self.layers[:model])
        genome[start : start + self.layers[model]] = 1.0
        return genome

    def initial_population(self, size: int, seed: int, include_probability: float,
                           scale_spread: float = 0.0) -> list[np.ndarray]:
        """Each model's own path first (every scale 1: the working models as they are), then random paths (each
        slot in with `include_probability`) whose scales are drawn from N(1, `scale_spread`) clipped to
        `scale_range` (spread 0: all 1, as before) -- crossover cannot move a scale both parents hold alike."""
        if not 0 < include_probability <= 1:
            raise MergeError(f"search.include_probability must be in (0, 1], got {include_probability}")
        if not scale_spread >= 0:
            raise MergeError(f"search.scale_init_spread must be >= 0, got {scale_spread}")
        rng = np.random.default_rng(seed)
        population = [self.model_path(m) for m in range(len(self.models))][:size]
        while len(population) < size:
            indicators = (rng.random(self.slots) < include_probability).astype(float)
            if indicators.any():
                scales = (self.to_unit(rng.normal(1.0, scale_spread, self.blocks**2)) if scale_spread > 0
                          else np.full(self.blocks**2, self.unit_scale()))
                population.append(np.concatenate([indicators, scales]))
        return population

    def used_scales(self, genome: np.ndarray) -> np.ndarray:
        """The genome coordinates of the scales its path uses (block i then block j uses scales[i][j]), each once."""
        blocks = np.flatnonzero(np.asarray(genome[: self.slots]) >= 0.5) % self.blocks
        return self.slots + np.unique(blocks[:-1] * self.blocks + blocks[1:])

    def perturb_used_scales(self, genome: np.ndarray, rng: np.random.Generator, probability: float,
                            sigma: float) -> np.ndarray:
        """`genome` with each scale its path uses moved, with `probability`, by N(0, `sigma`) in scale units (kept
        in the box). Only these scales change the model: a step on any other is invisible to the fitness."""
        low, high = self.scale_range
        used = self.used_scales(genome)
        moved = used[rng.random(len(used)) < probability]
        mutated = np.array(genome, dtype=float)
        scales = low + mutated[moved] * (high - low)
        mutated[moved] = self.to_unit(scales + rng.normal(0.0, sigma, len(moved)))
        return mutated
