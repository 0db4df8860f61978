"""The merge-method registry: a method is one decorated function whose typed signature declares its values.

In the spirit of mergekit's ``@merge_method`` (``mergekit/merge_methods/easy_define.py``): the keyword-only
parameters of the registered function *are* the method's recipe values --

* ``weight: PerModel = Value(1.0, search=(0.0, 1.5))``: one number per model in every layer group;
* ``t: PerGroup = Value(0.5, search=(0.0, 1.0), low=0.0, high=1.0)``: one number per layer group;
* ``normalize: bool = True``: a method-wide option, validated by pydantic against its annotation
  (``Annotated[float, Field(ge=0, le=1)]``, ``Literal["dare", "l1"]``, ...). A trailing ``_`` is dropped from
  the recipe key, so ``lambda_`` is the recipe's (and mergekit's) ``lambda``.

The recipe validates against these, the genome codes the per-model and per-group values in their search ranges,
the merge paths call the function once per tensor with an `Inputs`, and the export reads `Mergekit`.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    get_args,
    get_origin,
    get_type_hints,
)

from evomerge.errors import RecipeError
from pydantic import ConfigDict, Field, ValidationError, create_model
from torch import Tensor

if TYPE_CHECKING:
    from evomerge.merge.methods.sparsify import MagnitudeTable


class Scope(Enum):
    MODEL = "model"
    GROUP = "group"


PerModel = Annotated[tuple[float, ...], Scope.MODEL]
"""One value per model, in every layer group (e.g. ``weight``, ``density``)."""
PerGroup = Annotated[float, Scope.GROUP]
"""One value per layer group, shared by the models (e.g. ``slerp``'s ``t``)."""
Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A method-wide number (NaN and infinities refused)."""


@dataclass(frozen=True)
class Value:
    """A per-model or per-group number: its default, the bounds a recipe must keep, and the range a search maps
    the unit box onto (a search may narrow or move it with ``search.ranges.<key>``, within the bounds)."""

    default: float
    search: tuple[float, float]
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # (low, high] instead of [low, high]

    def bounds(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


@dataclass(frozen=True)
class Inputs:
    """One tensor to merge: its name (which keys random drops), the base's and each model's copy, where to write
    the result (``out``, in place, or a new tensor), and what the merge paths prepared for the method."""

    name: str
    base: Tensor | None
    tensors: Sequence[Tensor]
    out: Tensor | None = None
    magnitude_tables: Sequence[MagnitudeTable] | None = None  # methods with ``magnitude_tables=True``
    statistics: Sequence[Tensor] | None = None  # methods with ``statistics=...``: one per model, or None


@dataclass(frozen=True)
class Mergekit:
    """How a recipe of this method is written as a mergekit config.

    ``name``: mergekit's method (None: mergekit has none; the export writes ``linear`` and says so).
    ``options``: the recipe's options as mergekit's global parameters (default: as they are, same names). ``notes``: what mergekit then does differently, one line each (empty: the same
    tensors up to float rounding); it is given the recipe and the checkpoints' half-precision dtypes.
    ``base_model``: "base" (the recipe's base, if any) or "first" (slerp's t = 0 end). ``per_model``: the
    per-model values mergekit reads (None: all of them; karcher's weights, which mergekit ignores, are left out).
    """

    name: str | None
    options: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    notes: Callable[[Any, Sequence[str]], list[str]] = lambda recipe, half: []
    base_model: Literal["base", "first"] = "base"
    per_model: tuple[str, ...] | None = None

    def parameters(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options) if self.options is None else self.options(options)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function and what its signature declares."""

    name: str
    function: Callable[..., Tensor]
    base: Literal["required", "none", "optional"]
    per_model: Mapping[str, Value]
    per_group: Mapping[str, Value]
    options: Mapping[str, Any]  # recipe key -> default
    mergekit: Mergekit
    paper: str
    n_models: tuple[int, int | None] = (1, None)  # at least, at most
    statistics: str | None = None  # "fisher" or "gram": per-model statistics from prompts
    magnitude_tables: bool = False  # the in-memory merger prepares `MagnitudeTable`s for it
    _option_model: Any = field(default=None, repr=False)
    _python_names: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def takes_base(self) -> bool:
        return self.base != "none"

    @property
    def values(self) -> Mapping[str, Value]:
        """The per-model and per-group values, in genome order (per-model first)."""
        return {**self.per_model, **self.per_group}

    def check_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The method's options with ``given`` applied and validated; one `RecipeError` line on a bad one."""
        unknown = set(given) - set(self.options)
        if unknown:
            raise RecipeError(f"{self.name} has no parameter(s) {sorted(unknown)}; it takes {sorted(self.options) or 'none'}")
        try:  # a path option given as a Path is kept as its string, as YAML holds it
            checked = self._option_model.model_validate(
                {self._python_names[key]: os.fspath(value) if isinstance(value, os.PathLike) else value
                 for key, value in given.items()})
        except ValidationError as error:
            problem = error.errors()[0]
            key = next(k for k, name in self._python_names.items() if name == problem["loc"][0])
            raise RecipeError(f"{self.name} parameter {key!r}: {problem['msg'].lower()}, got {problem['input']!r}") from None
        values = checked.model_dump()
        return {key: values[self._python_names[key]] for key in sorted(self.options)}

    def check_value(self, key: str, value: Any, what: str) -> float:
        """A per-model or per-group value as a float, or one `RecipeError` line naming ``what``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{what} must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise RecipeError(f"{what} must be finite, got {number}")
        spec = self.values[key]
        if not spec.contains(number):
            raise RecipeError(f"{what} must be in {spec.bounds()}, got {number:g}")
        return number

    def __call__(self, inputs: Inputs, values: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
        """Merge one tensor with a recipe group's ``values`` and the recipe's ``options`` (recipe keys)."""
        arguments = {self._python_names.get(key, key): value for key, value in {**values, **options}.items()}
        return self.function(inputs, **arguments)


METHODS: dict[str, MergeMethod] = {}
"""Every registered method by name (filled when `evomerge.merge.methods` is imported)."""


def _recipe_key(name: str) -> str:
    return name[:-1] if name.endswith("_") else name


def merge_method(
    name: str,
    *,
    paper: str,
    mergekit: Mergekit,
    base: Literal["required", "none", "optional"] = "required",
    n_models: tuple[int, int | None] = (1, None),
    statistics: str | None = None,
    magnitude_tables: bool = False,
) -> Callable[[Callable[..., Tensor]], MergeMethod]:
    """Register ``function(inputs: Inputs, *, <values and options>) -> Tensor`` as merge method ``name``."""

    def register(function: Callable[..., Tensor]) -> MergeMethod:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        hints = get_type_hints(function, include_extras=True)
        per_model: dict[str, Value] = {}
        per_group: dict[str, Value] = {}
        fields: dict[str, Any] = {}
        options: dict[str, Any] = {}
        python_names: dict[str, str] = {}
        for parameter in list(inspect.signature(function).parameters.values())[1:]:
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: {parameter.name} must be keyword-only with a default")
            key, annotation = _recipe_key(parameter.name), hints[parameter.name]
            python_names[key] = parameter.name
            scope = next((m for m in get_args(annotation)[1:] if isinstance(m, Scope)), None) \
                if get_origin(annotation) is Annotated else None
            if scope is not None:
                if not isinstance(parameter.default, Value):
                    raise TypeError(f"{name}: {parameter.name} needs a Value(...) default")
                (per_model if scope is Scope.MODEL else per_group)[key] = parameter.default
            else:
                fields[parameter.name] = (annotation, parameter.default)
                options[key] = parameter.default
        option_model = create_model(f"{name}_options", __config__=ConfigDict(strict=True, extra="forbid"), **fields)
        method = MergeMethod(
            name=name, function=function, base=base, per_model=MappingProxyType(per_model),
            per_group=MappingProxyType(per_group), options=MappingProxyType(options), mergekit=mergekit, paper=paper,
            n_models=n_models, statistics=statistics, magnitude_tables=magnitude_tables,
            _option_model=option_model, _python_names=MappingProxyType(python_names),
        )
        METHODS[name] = method
        return method

    return register


def method(name: str) -> MergeMethod:
    """The registered method ``name``, or one `RecipeError` line listing the known ones."""
    found = METHODS.get(name) if isinstance(name, str) else None
    if found is None:
        raise RecipeError(f"unknown merge method {name!r}; known: {sorted(METHODS)}")
    return found


WEIGHT = Value(1.0, search=(0.0, 1.5))
"""A model's weight (above 1 a task vector is amplified)."""
DENSITY = Value(1.0, search=(0.1, 1.0), low=0.0, high=1.0, low_open=True)
"""The share of a task vector's entries kept."""
