"""nuslerp, multislerp and karcher: the same tensors as mergekit 0.1.5 (its functions on random tensors, its merges of
tiny float32 and bf16 checkpoints, from hand-written and from exported per-layer-group configs), in-memory merge ==
disk merge bit for bit, every genome point a valid finite merge, bad values one-line RecipeErrors.

Tolerances.  All three methods are deterministic, and evomerge computes what mergekit computes, except that its norms
and dot products are float64 sums (mergekit's are float32 reductions) and it applies the resulting coefficients in
one fused pass (mergekit: several float32 steps).  At float32 the results differ by a few float32 roundings:
|ours - mergekit| <= FLOAT32_TOLERANCE * max|mergekit| per tensor (2^-20, i.e. 8 ulps of the tensor's largest entry;
measured: at most ~2^-22).  At bf16 such a difference moves a result across a bf16 rounding boundary only where the
float32 value lies within it of a midpoint: every entry within one bf16 ulp, and at most MAX_BF16_DIFFERENT of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bf16_differences, run_mergekit
from evomerge.errors import RecipeError
from evomerge.export import mergekit_config, mergekit_notes
from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.methods import METHODS, kernels
from evomerge.merge.methods.karcher import karcher, karcher_alphas, karcher_coefficients
from evomerge.merge.methods.multislerp import gram, multislerp
from evomerge.merge.methods.nuslerp import interpolation_point, nuslerp
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader
from evomerge.recipe import GroupValues, PSRecipe
from evomerge.search.genome import PSGenomeSpace

pytest.importorskip("mergekit.merge", reason="mergekit (a dev extra) is not installed")

from mergekit.merge_methods import registry as mergekit_methods  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: E402
from mergekit.merge_methods.nuslerp import nuslerp as mergekit_nuslerp  # noqa: E402

GROUPS = ("embed", "blocks.0", "blocks.1", "head")
FLOAT32_TOLERANCE = 2.0**-20  # relative to a tensor's largest entry: 8 float32 ulps there
MAX_BF16_DIFFERENT = 1e-4  # of all entries (measured: at most 3 of 143,680, 2e-5)


# --------------------------------------------------------------------------- fixtures


def per_group_recipe(method: str, paths: dict[str, Path], *, base: bool, models: tuple[str, ...],
                     weights=None, **parameters) -> PSRecipe:
    """Values that differ in every layer group and between the models."""
    weights = weights or (lambda index: [0.3 + 0.2 * index, 0.9 - 0.15 * index, 0.5 + 0.1 * index][:len(models)])
    groups = tuple(GroupValues(name, {"weight": weights(index)}) for index, name in enumerate(GROUPS))
    return PSRecipe(method=method, base=str(paths["base"]) if base else None,
                    models=tuple(str(paths[model]) for model in models), groups=groups, parameters=parameters)


def float32_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (0 for two zero tensors)."""
    scale = float(theirs.float().abs().max())
    gap = float((ours.float() - theirs.float()).abs().max())
    return gap / scale if scale else gap


def assert_float32_close(ours: CheckpointReader, theirs: CheckpointReader, what: str) -> float:
    assert set(ours.names) == set(theirs.names)
    worst = 0.0
    for name in ours.names:
        mine, other = ours.read(name), theirs.read(name)
        assert mine.dtype == other.dtype == torch.float32, name
        gap = float32_gap(mine, other)
        assert gap <= FLOAT32_TOLERANCE, f"{what} {name}: {gap:.3g} of the largest entry"
        worst = max(worst, gap)
    return worst


def assert_bf16_close(ours: CheckpointReader, theirs: CheckpointReader, what: str) -> tuple[int, int]:
    different, total = bf16_differences(ours, theirs, what)
    assert different <= MAX_BF16_DIFFERENT * total, f"{what}: {different} of {total} entries differ"
    return different, total


# --------------------------------------------------------------------------- the tensor functions vs mergekit's


def _random(*shape, seed=0, scale=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _mergekit_nuslerp(t, first, second, base, flatten, row_wise):
    dim = 0 if row_wise else -1
    if base is None:
        return mergekit_nuslerp(t, first, second, dim=dim, flatten=flatten)
    return base + mergekit_nuslerp(t, first - base, second - base, dim=dim, flatten=flatten)


def _mergekit_multislerp(tensors, weights, base, **options):
    group = TensorGroup.from_tensors(([base] if base is not None else []) + list(tensors),
                                     base_index=0 if base is not None else None)
    return mergekit_methods.get("multislerp")([group], parameters={"weight": list(weights), **options},
                                              dtype=torch.float32)[0]


NUSLERP_LAYOUTS = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize("flatten, row_wise", NUSLERP_LAYOUTS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 1.0), (0.2, 1.3), (0.0, 0.0), (-0.4, 1.0)])
def test_nuslerp_is_mergekits(flatten, row_wise, with_base, weights):
    base = _random(48, 40, seed=1)
    first, second = base + _random(48, 40, seed=2), base + _random(48, 40, seed=3)
    first[3] = base[3]  # a row whose task vector is zero (a row-wise merge meets it)
    second[:, 5] = base[:, 5]  # a column of the second's
    second[7] = first[7]  # a row equal in both models: (anti)parallel in the no-base merge
    base[9], first[9] = 0.0, _random(40, seed=4, scale=1e-9)  # a vector shorter than mergekit's norm floor 1e-7
    t = interpolation_point(weights)
    base = base if with_base else None
    ours = nuslerp(t, first, second, base, flatten=flatten, row_wise=row_wise)
    theirs = _mergekit_nuslerp(t, first, second, base, flatten, row_wise)
    assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE


def test_nuslerp_weights_give_t_as_mergekit_does():
    assert interpolation_point((0.7, 0.3)) == pytest.approx(0.3)
    assert interpolation_point((0.0, 0.0)) == 0.5 and interpolation_point((1.0, -1.0 + 1e-7)) == 0.5
    assert interpolation_point((0.0, 2.0)) == 1.0
    first, second = _random(30, seed=4), _random(30, seed=5)
    assert float32_gap(nuslerp(0.0, first, second), first) <= FLOAT32_TOLERANCE
    assert float32_gap(nuslerp(1.0, first, second), second) <= FLOAT32_TOLERANCE


def test_nuslerp_one_dimensional_and_parallel_tensors():
    vector = _random(64, seed=6)
    for flatten, row_wise in NUSLERP_LAYOUTS:  # a 1-D tensor is one vector in every layout
        ours = nuslerp(0.25, vector, 2 * vector, flatten=flatten, row_wise=row_wise)
        theirs = _mergekit_nuslerp(0.25, vector, 2 * vector, None, flatten, row_wise)
        assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE
        assert float32_gap(ours, 1.25 * vector) <= FLOAT32_TOLERANCE  # parallel: linear interpolation


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_is_mergekits(count, with_base, normalize_weights):
    base = _random(40, 24, seed=10)
    tensors = [base + _random(40, 24, seed=11 + index) for index in range(count)]
    weights = [0.2, 0.9, 0.5, 1.4][:count]
    base = base if with_base else None
    ours = multislerp(tensors, weights, base, normalize_weights=normalize_weights)
    theirs = _mergekit_multislerp(tensors, weights, base, normalize_weights=normalize_weights)
    assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE
    if count == 1:
        assert torch.equal(ours, tensors[0])


def test_multislerp_edge_cases_as_mergekit():
    base = _random(30, 20, seed=20)
    delta = _random(30, 20, seed=21)
    # a zero task vector among others; eps; unnormalized weights; exactly antipodal tensors (no base: exactly)
    for tensors, weights, with_base, options in [
        ([base.clone(), base + delta], [0.4, 0.6], True, {}),
        ([base + delta, base + 2 * delta, base - 0.5 * delta], [0.3, 0.3, 0.4], True, {"eps": 1e-3}),
        ([delta, -delta], [0.5, 0.5], False, {}),  # the weighted mean vanishes: linear fallback
        ([delta, -delta], [0.3, 0.7], False, {"normalize_weights": False}),
        ([base.clone(), base.clone()], [0.5, 0.5], True, {}),  # nobody changed the tensor: the base
    ]:
        ours = multislerp(tensors, weights, base if with_base else None, **options)
        theirs = _mergekit_multislerp(tensors, weights, base if with_base else None, **options)
        assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE, (weights, options)
    # where mergekit stops (3 models, vanishing mean) or gives NaN (weights summing to 0), evomerge stays finite
    unchanged = [base.clone(), base.clone(), base.clone()]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _mergekit_multislerp(unchanged, [1.0, 1.0, 1.0], base)
    assert torch.equal(multislerp(unchanged, [1.0, 1.0, 1.0], base), base)
    merged = multislerp([base + delta, base + 2 * delta], [0.0, 0.0], base)
    assert torch.equal(merged, base)
    assert bool(torch.isnan(_mergekit_multislerp([base + delta, base + 2 * delta], [0.0, 0.0], base)).all())


def test_multislerp_is_the_scaled_normalized_mean():
    """The tangent step of mergekit's algorithm cancels: the result is (sum w_i |x_i|) * normalize(sum w_i u_i)."""
    tensors = [_random(50, seed=30 + index) for index in range(3)]
    weights = [0.5, 0.25, 0.25]
    units = [tensor / tensor.norm() for tensor in tensors]
    mean = sum(w * u for w, u in zip(weights, units))
    expected = sum(w * t.norm() for w, t in zip(weights, tensors)) * mean / mean.norm()
    assert float32_gap(multislerp(tensors, weights), expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("weights", ["equal", "unequal"])
@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (50, 1e-7), (10, 0.0)])
def test_karcher_is_mergekits(count, weights, max_iter, tol):
    """Task-vector-like tensors (std 0.02 moves of a std 0.02 base: ~60 degrees apart), so the iteration moves."""
    base = _random(36, 20, seed=40)
    tensors = [base + _random(36, 20, seed=41 + index) for index in range(count)]
    values = [1.0] * count if weights == "equal" else [0.2, 1.1, 0.5, 0.9][:count]
    ours = karcher(tensors, values, max_iter=max_iter, tol=tol)
    theirs = karcher_merge_tensors(tensors, [value / sum(values) for value in values], max_iter=max_iter, tol=tol)
    assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE


def test_karcher_iterates_to_the_weighted_frechet_mean():
    """Two models: the weighted Karcher mean lies on their great circle at fraction a_2 (a slerp); mergekit's
    uniform alphas with 1 and 0 iterations differ, so the iteration is exercised."""
    first, second = _random(80, seed=50), _random(80, seed=51)
    alphas = karcher_alphas([0.3, 0.9])
    grams = gram([first, second])
    coefficients = karcher_coefficients(grams, alphas, max_iter=50, tol=1e-12)
    norms = [first.norm(), second.norm()]
    direction = coefficients[0] * first + coefficients[1] * second
    direction = direction / direction.norm()
    expected = nuslerp(alphas[1], first / norms[0], second / norms[1])
    assert float32_gap(direction, expected / expected.norm()) < 1e-6
    one_step = karcher([first, second], [0.3, 0.9], max_iter=1)
    assert float32_gap(karcher([first, second], [0.3, 0.9], max_iter=0), one_step) > 1e-3


def test_karcher_edge_cases_as_mergekit():
    tensors = [_random(25, 4, seed=60 + index) for index in range(3)]
    zero = torch.zeros(25, 4)
    for inputs in ([zero, tensors[0], tensors[1]], [zero, zero], [tensors[0], tensors[0]],
                   [tensors[0], zero, zero]):
        ours = karcher(inputs, [1.0] * len(inputs))
        theirs = karcher_merge_tensors(inputs, karcher_alphas([1.0] * len(inputs)))
        assert float32_gap(ours, theirs) <= FLOAT32_TOLERANCE
    assert torch.equal(karcher([tensors[0]], [0.7]), tensors[0])
    # the kept models' weights all 0 (mergekit cannot meet this: it has no weights): uniform over the kept ones
    assert bool(torch.isfinite(karcher([tensors[0], tensors[1], zero], [0.0, 0.0, 1.0])).all())
    assert karcher_alphas([0.0, 0.0]) == [0.5, 0.5] and karcher_alphas([2.0, 2.0, 2.0]) == [1 / 3] * 3


# --------------------------------------------------------------------------- merged checkpoints vs mergekit


CASES = {  # id: method, base?, models, options, mergekit's parameters
    "nuslerp": ("nuslerp", False, ("expert_a", "expert_b"), {}),
    "nuslerp-base": ("nuslerp", True, ("expert_a", "expert_b"), {}),
    "nuslerp-rows": ("nuslerp", True, ("expert_a", "expert_b"), {"nuslerp_flatten": False}),
    "nuslerp-columns": ("nuslerp", False, ("expert_a", "expert_b"),
                        {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": ("multislerp", False, ("expert_a", "expert_b"), {}),
    "multislerp-base": ("multislerp", True, ("expert_a", "expert_b"), {"eps": 1e-6}),
    "multislerp-unnormalized": ("multislerp", True, ("expert_a", "expert_b"), {"normalize_weights": False}),
    "karcher": ("karcher", False, ("expert_a", "expert_b"), {"max_iter": 20}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit_at_float32(tiny_checkpoints, tmp_path, case):
    """A uniform recipe and the mergekit config written by hand, on the float32 tiny checkpoints."""
    method, with_base, models, options = CASES[case]
    weights = [1.0, 1.0] if method == "karcher" else [0.7, 0.4]
    recipe = PSRecipe.uniform(method, tiny_checkpoints["base"] if with_base else None,
                              [tiny_checkpoints[model] for model in models], parameters=options, weight=weights)
    config = {"merge_method": method, "dtype": "float32", "parameters": dict(options),
              "models": [{"model": str(tiny_checkpoints[model]), "parameters": {"weight": weight}}
                         for model, weight in zip(models, weights)]}
    if method == "karcher":
        config["models"] = [{"model": str(tiny_checkpoints[model])} for model in models]
    if with_base:
        config["base_model"] = str(tiny_checkpoints["base"])
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    assert_float32_close(ours, theirs, case)


def _three_model_recipes(paths):
    """multislerp and karcher over three models, no base: base and two experts (~60 degrees apart at float32)."""
    models = ("base", "expert_a", "expert_b")
    return {
        "multislerp": per_group_recipe("multislerp", paths, base=False, models=models),
        "karcher": per_group_recipe("karcher", paths, base=False, models=models,
                                    weights=lambda index: [0.5 + index] * 3),
    }


@pytest.mark.parametrize("case", [*sorted(CASES), "multislerp-3", "karcher-3"])
def test_mergekit_rebuilds_the_exported_config_at_float32(tiny_checkpoints, tmp_path, case):
    """The exported per-layer-group config (conditional parameter lists), run by mergekit."""
    if case.endswith("-3"):
        recipe = _three_model_recipes(tiny_checkpoints)[case[:-2]]
    else:
        method, with_base, models, options = CASES[case]
        weights = (lambda index: [0.4 + 0.3 * index] * 2) if method == "karcher" else None
        recipe = per_group_recipe(method, tiny_checkpoints, base=with_base, models=models, weights=weights, **options)
    config = mergekit_config(recipe)
    notes = mergekit_notes(recipe)
    expected_notes = 1 if case == "multislerp-3" else 0  # the conditional "mergekit stops with an error" note
    assert len(notes) == expected_notes, notes
    assert config["dtype"] == "float32" and ("base_model" in config) == (recipe.base is not None)
    if recipe.method == "karcher":  # mergekit's karcher reads no weights: none are written
        assert all("parameters" not in entry for entry in config["models"])
    else:
        assert isinstance(config["models"][0]["parameters"]["weight"], list)  # per-group values, conditional
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    assert_float32_close(ours, theirs, case)


BF16_CASES = {
    "nuslerp-base": ("nuslerp", True, ("expert_a", "expert_b"), {}),
    "nuslerp-rows": ("nuslerp", True, ("expert_a", "expert_b"), {"nuslerp_flatten": False}),
    "nuslerp-columns": ("nuslerp", False, ("expert_a", "expert_b"),
                        {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp-base": ("multislerp", True, ("expert_a", "expert_b", "expert_c"), {}),
    "multislerp": ("multislerp", False, ("expert_a", "expert_b"), {}),
    "karcher": ("karcher", False, ("expert_a", "expert_b", "expert_c"), {}),
}


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_mergekit_rebuilds_the_exported_config_at_bf16(tied_bf16, tmp_path, case):
    method, with_base, models, options = BF16_CASES[case]
    weights = (lambda index: [0.4 + 0.3 * index] * 3) if method == "karcher" else None
    recipe = per_group_recipe(method, tied_bf16, base=with_base, models=models, weights=weights, **options)
    config = mergekit_config(recipe)
    assert config["out_dtype"] == "bfloat16"
    assert len(mergekit_notes(recipe)) == (method == "multislerp" and len(models) > 2)
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    assert_bf16_close(ours, theirs, case)


def test_unequal_karcher_weights_export_with_a_note_and_mergekits_uniform_mean(tiny_checkpoints, tmp_path):
    """mergekit's karcher has no weights: with unequal ones the export says so, and mergekit's result is evomerge's
    with every weight equal."""
    models = ("base", "expert_a", "expert_b")
    weighted = per_group_recipe("karcher", tiny_checkpoints, base=False, models=models)
    notes = mergekit_notes(weighted)
    assert len(notes) == 1 and "uniformly" in notes[0] and all(name in notes[0] for name in GROUPS)
    theirs = run_mergekit(mergekit_config(weighted), tmp_path / "mergekit")
    uniform = per_group_recipe("karcher", tiny_checkpoints, base=False, models=models, weights=lambda i: [1.0] * 3)
    assert_float32_close(CheckpointReader(merge_to_disk(uniform, tmp_path / "uniform")), theirs, "karcher uniform")
    ours = CheckpointReader(merge_to_disk(weighted, tmp_path / "weighted"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert float32_gap(ours.read(name), theirs.read(name)) > 1e-2  # the weights matter


# --------------------------------------------------------------------------- in memory == disk


MEMORY_CASES = {
    "nuslerp": ("nuslerp", False, ("expert_a", "expert_b"), {}),
    "nuslerp-base-rows": ("nuslerp", True, ("expert_a", "expert_b"), {"nuslerp_flatten": False}),
    "nuslerp-columns": ("nuslerp", True, ("expert_a", "expert_b"), {"nuslerp_flatten": False,
                                                                     "nuslerp_row_wise": True}),
    "multislerp": ("multislerp", False, ("expert_a", "expert_b", "expert_c"), {}),
    "multislerp-base": ("multislerp", True, ("expert_a", "expert_b", "expert_c"), {}),
    "karcher": ("karcher", False, ("expert_a", "expert_b", "expert_c"), {}),
}


@pytest.fixture(scope="module")
def bf16_merger(tied_bf16):
    return InMemoryMerger(tied_bf16["base"], [tied_bf16[name] for name in ("expert_a", "expert_b",
                                                                                      "expert_c")])


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_in_memory_candidate_equals_disk_merge(bf16_merger, tied_bf16, tmp_path, case):
    method, with_base, models, options = MEMORY_CASES[case]
    recipe = per_group_recipe(method, tied_bf16, base=with_base, models=models, **options)
    state = bf16_merger.merge(recipe).state_dict()
    disk = CheckpointReader(merge_to_disk(recipe, tmp_path / "merged"))
    for name in disk.names:
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], disk.read(name)), name


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher"])
def test_in_memory_equals_disk_at_float32(tiny_checkpoints, tmp_path, method):
    merger = InMemoryMerger(tiny_checkpoints["base"], [tiny_checkpoints["expert_a"], tiny_checkpoints["expert_b"]])
    recipe = per_group_recipe(method, tiny_checkpoints, base=METHODS[method].takes_base,
                              models=("expert_a", "expert_b"))
    state = merger.merge(recipe).state_dict()
    disk = CheckpointReader(merge_to_disk(recipe, tmp_path / "merged"))
    for name in disk.names:
        assert torch.equal(state[name], disk.read(name)), name


# --------------------------------------------------------------------------- the search box


@pytest.mark.parametrize("method, options", [
    ("nuslerp", {}), ("nuslerp", {"nuslerp_flatten": False}), ("multislerp", {}),
    ("multislerp", {"normalize_weights": False}), ("karcher", {}),
])
def test_every_genome_point_merges_to_finite_tensors(bf16_merger, tied_bf16, method, options):
    spec = METHODS[method]
    least, most = spec.n_models
    models = tuple(str(tied_bf16[name]) for name in ("expert_a", "expert_b", "expert_c")[:most or 3])
    space = PSGenomeSpace(method, str(tied_bf16["base"]) if spec.takes_base else None, models, GROUPS,
                          parameters=options)
    rng = np.random.default_rng(0)
    corners = [np.zeros(space.dim), np.ones(space.dim)]
    for genome in [*corners, *rng.random((48, space.dim))]:
        recipe = space.decode(genome)
        assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe
        state = bf16_merger.merge(recipe).state_dict()  # raises MergeError on NaN / infinite entries
        assert all(bool(torch.isfinite(tensor.float()).all()) for tensor in state.values())


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("method, models, base, parameters, values, message", [
    ("nuslerp", 3, False, {}, {}, "nuslerp merges exactly 2 models, recipe lists 3"),
    ("nuslerp", 2, False, {"nuslerp_flatten": "yes"}, {}, "nuslerp parameter 'nuslerp_flatten'"),
    ("nuslerp", 2, False, {"eps": 1e-8}, {}, "nuslerp has no parameter(s) ['eps']"),
    ("nuslerp", 2, False, {}, {"weight": [1.0, float("nan")]}, "must be finite"),
    ("multislerp", 2, False, {"eps": 0.0}, {}, "multislerp parameter 'eps': input should be greater than 0"),
    ("multislerp", 2, False, {"eps": float("inf")}, {}, "multislerp parameter 'eps'"),
    ("multislerp", 2, True, {"normalize_weights": 1}, {}, "multislerp parameter 'normalize_weights'"),
    ("multislerp", 2, False, {}, {"weight": [1.0, "a"]}, "must be a number"),
    ("karcher", 2, True, {}, {}, "karcher takes no base model"),
    ("karcher", 2, False, {"max_iter": -1}, {}, "karcher parameter 'max_iter': input should be greater than or "
                                                  "equal to 0"),
    ("karcher", 2, False, {"max_iter": 2.5}, {}, "karcher parameter 'max_iter'"),
    ("karcher", 2, False, {"tol": -1e-5}, {}, "karcher parameter 'tol'"),
    ("karcher", 2, False, {}, {"weight": [1.0, -0.5]}, "must be in [0, inf], got -0.5"),
])
def test_bad_values_are_one_line_recipe_errors(method, models, base, parameters, values, message):
    with pytest.raises(RecipeError) as error:
        PSRecipe.uniform(method, "/m/base" if base else None, [f"/m/{index}" for index in range(models)],
                         parameters=parameters, **values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_configs_merge_with_their_defaults(tied_bf16, bf16_merger):
    """Each conf/merge YAML, read as Hydra reads it, builds a recipe over the pool that merges."""
    from omegaconf import OmegaConf

    from evomerge.resources import CONF_DIR

    for method in ("nuslerp", "multislerp", "karcher"):
        config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "merge" / f"{method}.yaml"))
        assert set(config) == {"method", *METHODS[method].values, *METHODS[method].options}
        recipe = PSRecipe.from_merge_config(config, str(tied_bf16["base"]),
                                            [str(tied_bf16["expert_a"]), str(tied_bf16["expert_b"])])
        bf16_merger.merge(recipe)


# --------------------------------------------------------------------------- compiled kernels


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    """Tensors of COMPILE_MIN_NUMEL entries or more run the fused kernel through torch.compile: the same results."""
    rows = 4 * kernels.COMPILE_MIN_NUMEL // 64 + 3
    base = _random(rows, 64, seed=70).to(torch.bfloat16)
    tensors = [(base.float() + _random(rows, 64, seed=71 + index, scale=2e-3)).to(torch.bfloat16) for index in range(3)]
    cases = {
        "nuslerp": lambda: nuslerp(0.3, tensors[0], tensors[1]),
        "nuslerp-base-rows": lambda: nuslerp(0.3, tensors[0], tensors[1], base, flatten=False),
        "nuslerp-columns": lambda: nuslerp(0.6, tensors[0], tensors[1], flatten=False, row_wise=True),
        "multislerp-base": lambda: multislerp(tensors, [0.2, 0.5, 0.3], base),
        "karcher": lambda: karcher(tensors, [0.2, 0.5, 0.3]),
    }
    compiled = {name: run() for name, run in cases.items()}
    assert kernels._compile_enabled, "torch.compile failed, so the eager kernels ran twice"
    monkeypatch.setattr(kernels, "_compile_enabled", False)
    for name, run in cases.items():
        assert torch.equal(compiled[name], run()), name
