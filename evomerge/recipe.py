"""Merge recipes: small frozen values with a canonical YAML form and a content hash.

A parameter-space recipe (`PSRecipe`) says which method merges which models, with method-wide options and
per-layer-group values (one per model for ``weight``/``density``, one per group for ``slerp``'s ``t``).
Construction fills defaults and validates, so two recipes that mean the same merge have the same YAML and
the same `hash` -- the search uses the hash as a cache key and the merged model's card records the YAML.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import yaml

from evomerge.errors import MergeError, RecipeError
from evomerge.merge.groups import check_disjoint
from evomerge.merge.methods import METHODS, MergeMethod, method

DEFAULT_GROUPS: tuple[str, ...] = ("embed", "blocks", "head")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RecipeError(f"{what} must be finite, got {number}")
    return number


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror or error}") from None


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text as data, or one `RecipeError` line naming the file and where the syntax breaks."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise RecipeError(f"{where} is not valid YAML{at}: {getattr(error, 'problem', None) or error}") from None


@dataclass(frozen=True)
class GroupValues:
    """Recipe values for one layer group: per-model tuples (``weight``, ``density``) or per-group floats (``t``)."""

    name: str
    values: Mapping[str, tuple[float, ...] | float]

    def __getitem__(self, key: str) -> tuple[float, ...] | float:
        return self.values[key]

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.values.items())))


@dataclass(frozen=True)
class PSRecipe:
    """A parameter-space merge recipe; build it directly, with `uniform`, or from YAML."""

    method: str
    models: tuple[str, ...]
    groups: tuple[GroupValues, ...]
    base: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "ps"

    def __post_init__(self) -> None:
        spec = method(self.method)
        if isinstance(self.models, (str, Path)):
            raise RecipeError("models must be a list of paths, not a single string")
        models = tuple(str(model) for model in self.models)
        if not models:
            raise RecipeError(f"{self.method} recipe lists no models")
        least, most = spec.n_models
        if least == most and len(models) != least:
            raise RecipeError(f"{self.method} merges exactly {least} models, recipe lists {len(models)}")
        if len(models) < least or (most is not None and len(models) > most):
            raise RecipeError(f"{self.method} merges {least} to {most or 'any number of'} models, recipe lists "
                              f"{len(models)}")
        base = None if self.base is None else str(self.base)
        if spec.needs_base and base is None:
            raise RecipeError(f"{self.method} needs a base model (task vectors are model - base)")
        if not spec.takes_base and base is not None:
            raise RecipeError(f"{self.method} takes no base model; drop 'base' or use a task-vector method")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "parameters", MappingProxyType(spec.check_options(self.parameters)))
        object.__setattr__(self, "groups", tuple(self._canonical_group(spec, group) for group in self.groups))
        if not self.groups:
            raise RecipeError(f"{self.method} recipe has no layer groups")
        try:
            check_disjoint([group.name for group in self.groups])
        except MergeError as error:
            raise RecipeError(f"{self.method} recipe: {error}") from error

    def _canonical_group(self, spec: MergeMethod, group: GroupValues | Mapping[str, Any]) -> GroupValues:
        if isinstance(group, GroupValues):
            name, given = group.name, dict(group.values)
        else:
            given = dict(group)
            name = given.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f"every layer group needs a string 'name', got {name!r}")
        unknown = set(given) - set(spec.values)
        if unknown:
            raise RecipeError(
                f"group {name!r}: {self.method} has no per-group value(s) {sorted(unknown)}; "
                f"it takes {sorted(spec.values)}"
            )
        values: dict[str, tuple[float, ...] | float] = {}
        for key, value in spec.per_model.items():
            raw = given.get(key, value.default)
            items = list(raw) if isinstance(raw, (list, tuple)) else [raw] * len(self.models)
            if len(items) != len(self.models):
                raise RecipeError(
                    f"group {name!r}: {key} has {len(items)} values but the recipe has {len(self.models)} models"
                )
            numbers = []
            for model, item in zip(self.models, items):
                numbers.append(spec.check_value(key, item, f"group {name!r}: {key} for model {model!r}"))
            values[key] = tuple(numbers)
        for key, value in spec.per_group.items():
            values[key] = spec.check_value(key, given.get(key, value.default), f"group {name!r}: {key}")
        return GroupValues(name, MappingProxyType(values))

    def __hash__(self) -> int:
        return hash(self.hash)

    @property
    def spec(self) -> MergeMethod:
        return METHODS[self.method]

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(group.name for group in self.groups)

    @classmethod
    def uniform(
        cls,
        method: str,
        base: str | Path | None,
        models: Sequence[str | Path],
        *,
        groups: Iterable[str] = DEFAULT_GROUPS,
        parameters: Mapping[str, Any] | None = None,
        **values: float | Sequence[float],
    ) -> PSRecipe:
        """The same ``values`` (e.g. ``weight=[0.6, 0.4], density=0.5``) in every group named in ``groups``."""
        return cls(
            method=method,
            base=None if base is None else str(base),
            models=tuple(str(model) for model in models),
            groups=tuple(GroupValues(name, dict(values)) for name in groups),
            parameters=dict(parameters or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        groups = []
        for group in self.groups:
            entry: dict[str, Any] = {"name": group.name}
            for key, value in group.values.items():
                entry[key] = list(value) if isinstance(value, tuple) else value
            groups.append(entry)
        return {
            "kind": self.kind,
            "method": self.method,
            "base": self.base,
            "models": list(self.models),
            "parameters": dict(self.parameters),
            "groups": groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PSRecipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        kind = data.get("kind", cls.kind)
        if kind != cls.kind:
            raise RecipeError(f"not a parameter-space recipe: kind is {kind!r}, expected {cls.kind!r}")
        unknown = set(data) - {"kind", "method", "base", "models", "parameters", "groups"}
        if unknown:
            raise RecipeError(f"recipe has unknown key(s) {sorted(unknown)}")
        for key in ("method", "models"):
            if key not in data:
                raise RecipeError(f"recipe is missing {key!r}")
        return cls(
            method=data["method"],
            base=data.get("base"),
            models=tuple(data["models"]),
            groups=tuple(data.get("groups") or ({"name": name} for name in DEFAULT_GROUPS)),
            parameters=dict(data.get("parameters") or {}),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @classmethod
    def from_merge_config(cls, merge: Mapping[str, Any], base: str | None, models: Sequence[str],
                          groups: Sequence[str] | None = None) -> PSRecipe:
        """A uniform recipe from a ``conf/merge`` entry (``method`` plus values and options): per-model and per-group
        values go to every group, the rest are method options; ``base`` is used when the method takes one."""
        settings = dict(merge)
        spec = method(settings.pop("method", None))
        values = {key: settings.pop(key) for key in list(settings) if key in spec.values}
        extra = {} if groups is None else {"groups": list(groups)}
        return cls.uniform(spec.name, base if spec.takes_base else None, models, parameters=settings, **extra, **values)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> PSRecipe:
        return cls.from_dict(_parse_yaml(text, where))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> PSRecipe:
        return cls.from_yaml(_read(path), str(path))

    @property
    def hash(self) -> str:
        """First 12 hex digits of the SHA-256 of the canonical YAML: equal for recipes that mean the same merge."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Hop:
    """One step of a layer path: block `layer` of pool model `model`, its input multiplied by `scale`."""

    model: int
    layer: int
    scale: float


@dataclass(frozen=True)
class DFSRecipe:
    """A data-flow-space recipe (EvoLLM's DFS): which blocks of which models run, in what order, at what scale.

    The M blocks of all models, laid out in order (model 1's, then model 2's, ...), are repeated `repeats`
    times: T = M x repeats slots, and `include[t]` says whether slot t's block runs. When block j runs right
    after block i, its input is multiplied by `scales[i][j]` (the first block's input is not scaled).
    Embeddings, final norm and head come from `models[embed_from]`. Only the resulting path defines the
    model, so recipes that differ in unused slots or scales share a `hash`.
    """

    models: tuple[str, ...]
    layers: tuple[int, ...]  # blocks per model
    repeats: int
    include: tuple[bool, ...]
    scales: tuple[tuple[float, ...], ...]  # M x M, indexed by global block number
    embed_from: int = 0

    kind: ClassVar[str] = "dfs"

    def __post_init__(self) -> None:
        if isinstance(self.models, (str, Path)) or not self.models:
            raise RecipeError("a DFS recipe needs a list of one or more models")
        object.__setattr__(self, "models", tuple(str(model) for model in self.models))
        if len(self.layers) != len(self.models) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                        for n in self.layers):
            raise RecipeError(f"layers must give a positive block count per model ({len(self.models)}), got "
                              f"{list(self.layers)}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise RecipeError(f"repeats must be a positive integer, got {self.repeats!r}")
        if len(self.include) != self.slots:
            raise RecipeError(f"include has {len(self.include)} entries; {self.blocks} blocks x {self.repeats} "
                              f"repeats make {self.slots} slots")
        object.__setattr__(self, "include", tuple(bool(flag) for flag in self.include))
        if len(self.scales) != self.blocks or any(len(row) != self.blocks for row in self.scales):
            raise RecipeError(f"scales must be a {self.blocks} x {self.blocks} matrix (one row and column per block)")
        object.__setattr__(self, "scales", tuple(
            tuple(_number(value, f"scales[{i}][{j}]") for j, value in enumerate(row))
            for i, row in enumerate(self.scales)
        ))
        if isinstance(self.embed_from, bool) or self.embed_from not in range(len(self.models)):
            raise RecipeError(f"embed_from must index one of the {len(self.models)} models, got {self.embed_from!r}")

    @property
    def blocks(self) -> int:
        return sum(self.layers)

    @property
    def slots(self) -> int:
        return self.blocks * self.repeats

    def block(self, index: int) -> tuple[int, int]:
        """(model, layer) of global block `index`."""
        for model, count in enumerate(self.layers):
            if index < count:
                return model, index
            index -= count
        raise IndexError(index)

    @property
    def path(self) -> tuple[Hop, ...]:
        hops, previous = [], None
        for slot, included in enumerate(self.include):
            if not included:
                continue
            current = slot % self.blocks
            scale = 1.0 if previous is None else self.scales[previous][current]
            hops.append(Hop(*self.block(current), scale))
            previous = current
        return tuple(hops)

    def __hash__(self) -> int:
        return hash(self.hash)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "models": list(self.models),
            "layers": list(self.layers),
            "repeats": self.repeats,
            "embed_from": self.embed_from,
            "include": [int(flag) for flag in self.include],
            "scales": [list(row) for row in self.scales],
            "path": [[hop.model, hop.layer, hop.scale] for hop in self.path],  # derived; for readers
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DFSRecipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        if data.get("kind") != cls.kind:
            raise RecipeError(f"not a data-flow recipe: kind is {data.get('kind')!r}, expected {cls.kind!r}")
        required = {"models", "layers", "repeats", "include", "scales"}
        missing = required - set(data)
        if missing:
            raise RecipeError(f"DFS recipe is missing {sorted(missing)}")
        unknown = set(data) - required - {"kind", "embed_from", "path"}
        if unknown:
            raise RecipeError(f"DFS recipe has unknown key(s) {sorted(unknown)}")
        return cls(tuple(data["models"]), tuple(data["layers"]), data["repeats"], tuple(data["include"]),
                   tuple(tuple(row) for row in data["scales"]), data.get("embed_from", 0))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> DFSRecipe:
        return cls.from_dict(_parse_yaml(_read(path), str(path)))

    @property
    def hash(self) -> str:
        """Of the models, the embedding owner and the path -- what the model computes."""
        effective = {"kind": self.kind, "models": list(self.models), "embed_from": self.embed_from,
                     "path": [[hop.model, hop.layer, hop.scale] for hop in self.path]}
        return hashlib.sha256(yaml.safe_dump(effective).encode()).hexdigest()[:12]


def load_recipe(path: str | Path) -> PSRecipe | DFSRecipe:
    """A recipe file of either kind (its `kind` key says which; parameter-space when absent)."""
    data = _parse_yaml(_read(path), str(path))
    if isinstance(data, Mapping) and data.get("kind") == DFSRecipe.kind:
        return DFSRecipe.from_dict(data)
    return PSRecipe.from_dict(data)
