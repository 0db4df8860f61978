"""della, della_linear, breadcrumbs and breadcrumbs_ties against mergekit 0.1.5, on both merge paths and in the search.

What each comparison with mergekit can expect:

* Breadcrumbs selects deterministically: the same float32 operations as mergekit, so on float32 checkpoints the
  merged tensors are equal to float rounding (measured: bit-equal without rescale; with rescale evomerge sums the
  L1 norms in float64, mergekit in float32, so the scale differs by about one float32 ulp (measured 1.5e-7
  relative) and merged entries by at most 1.5e-8: within FLOAT32_RTOL relative or FLOAT32_ATOL absolute).  Among
  magnitudes tied at a cut mergekit's unstable sort chooses arbitrarily: with its sort made to rank ties as
  evomerge does (by index) the tools agree everywhere; unpatched they differ only where a model has a magnitude
  tied at one of its two cuts.
* DELLA draws at random.  Fed evomerge's draws (mergekit's torch.bernoulli patched to compare evomerge's counter-based
  draws with mergekit's own keep probabilities, its argsort made stable), mergekit gives evomerge's tensors to
  float rounding: the probabilities are bit-equal, so the masks are equal.  Unpatched, the two agree in
  distribution: kept shares, their growth with magnitude rank and the rescale factors are compared within
  5-sigma binomial bounds; density 1 is deterministic (nothing dropped) and compared exactly.
* At bf16 the merged float32 tensors are rounded to bf16: where they differ by a float32 rounding, an entry near a
  bf16 rounding midpoint may round the other way (one bf16 ulp, at most MAX_DIFFERENT of the entries).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import BF16_ULP, run_mergekit
from evomerge.errors import RecipeError
from evomerge.export import mergekit_config, mergekit_notes, mergekit_yaml
from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.methods import METHODS, Inputs, della as della_module
from evomerge.merge.methods.breadcrumbs import outlier_counts, outlier_trim
from evomerge.merge.methods.della import della_prune, effective_epsilon, keep_probabilities
from evomerge.merge.methods.kernels import hash_draws
from evomerge.merge.methods.sparsify import dare_key
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader
from evomerge.recipe import GroupValues, PSRecipe
from evomerge.search.genome import PSGenomeSpace

pytest.importorskip("mergekit.merge", reason="mergekit (a dev extra) is not installed")
import mergekit.merge_methods.generalized_task_arithmetic as mergekit_gta  # noqa: E402
import mergekit.sparsify as mergekit_sparsify  # noqa: E402

GROUPS = ("embed", "blocks.0", "blocks.1", "head")
DELLA = ("della", "della_linear")
BREADCRUMBS = ("breadcrumbs", "breadcrumbs_ties")
METHOD_NAMES = DELLA + BREADCRUMBS
FLOAT32_RTOL = 2e-6  # a scale of L1 sums in float64 vs float32: ~1 float32 ulp (measured 1.5e-7 relative)
FLOAT32_ATOL = 1e-7  # ~1 float32 ulp at 1.0, the largest weights here (measured max difference 1.5e-8)
MAX_DIFFERENT = 1e-4  # share of entries a float32 rounding difference may flip at bf16
SIGMAS = 5.0  # binomial bounds for the random part


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def checkpoints(request, tiny_checkpoints, tied_bf16):
    return tiny_checkpoints if request.param == "float32" else tied_bf16


def third_value(method: str) -> str:
    return "epsilon" if method in DELLA else "gamma"


def per_group_recipe(method: str, paths, **parameters) -> PSRecipe:
    """Values that differ in every layer group and between the two models (della: density +/- epsilon valid)."""
    groups = []
    for index, name in enumerate(GROUPS):
        values = {"weight": [0.3 + 0.2 * index, 0.9 - 0.15 * index],
                  "density": [0.3 + 0.12 * index, 0.7 - 0.1 * index]}
        values[third_value(method)] = [0.05 + 0.03 * index, 0.2 - 0.04 * index] if method in DELLA \
            else [0.01 * index, round(0.3 - 0.1 * index, 6)]
        groups.append(GroupValues(name, values))
    return PSRecipe(method=method, base=str(paths["base"]), models=(str(paths["expert_a"]), str(paths["expert_b"])),
                    groups=tuple(groups), parameters=parameters)


def hand_config(method: str, paths, values: dict, parameters: dict, out_dtype: str | None) -> dict:
    """A mergekit config written by hand (not by evomerge's export) for a uniform recipe."""
    models = [{"model": str(paths[key]), "parameters": {k: v[index] for k, v in values.items()}}
              for index, key in enumerate(("expert_a", "expert_b"))]
    config = {"merge_method": method, "base_model": str(paths["base"]), "models": models,
              "parameters": parameters, "dtype": "float32"}
    if out_dtype:
        config["out_dtype"] = out_dtype
    return config


def fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest() + str(tuple(tensor.shape))


@contextmanager
def mergekit_with_our_draws(monkeypatch, paths, seed: int):
    """mergekit's DELLA fed evomerge's draws: its sparsify learns which (tensor, model) a task vector is, its
    torch.bernoulli(p) keeps where evomerge's draw for that entry is below p, and its argsort is stable (ties
    ranked by index, as evomerge does).  Yields the keep probabilities mergekit computed, by (tensor, model)."""
    base = CheckpointReader(paths["base"])
    models = [CheckpointReader(paths[key]) for key in ("expert_a", "expert_b")]
    owners: dict[str, tuple[str, int]] = {}
    for name in base.names:
        for index, model in enumerate(models):
            delta = model.read(name).float() - base.read(name).float()
            assert fingerprint(delta) not in owners, name
            owners[fingerprint(delta)] = (name, index)
    current: dict[str, tuple[str, int]] = {}
    probabilities: dict[tuple[str, int], torch.Tensor] = {}
    real_sparsify, real_argsort = mergekit_gta.sparsify, torch.argsort

    def sparsify(tensor, **kwargs):
        current["owner"] = owners[fingerprint(tensor)]
        return real_sparsify(tensor, **kwargs)

    def bernoulli(p, *args, **kwargs):
        name, index = current["owner"]
        probabilities[name, index] = p.clone()
        key = torch.tensor(dare_key(seed, name, index), dtype=torch.int64)
        return (hash_draws(p.numel(), key).view(p.shape) < p).to(p.dtype)

    def argsort(tensor, dim=-1, descending=False, stable=False):
        return real_argsort(tensor, dim=dim, descending=descending, stable=True)

    with monkeypatch.context() as patch:
        patch.setattr(mergekit_gta, "sparsify", sparsify)
        patch.setattr(torch, "bernoulli", bernoulli)
        patch.setattr(torch, "argsort", argsort)
        yield probabilities


@contextmanager
def mergekit_ranking_ties_by_index(monkeypatch):
    """mergekit's magnitude_outliers with its ascending sort ranking equal magnitudes as evomerge does: of two
    tied entries the lower index counts as larger (a stable descending sort, reversed)."""
    real_sort, real_argsort = torch.sort, torch.argsort

    def sort(tensor, dim=-1, descending=False, stable=False, **kwargs):
        if tensor.dim() != 1 or descending or kwargs:
            return real_sort(tensor, dim=dim, descending=descending, stable=stable, **kwargs)
        indices = real_argsort(tensor, descending=True, stable=True).flip(0)
        return SimpleNamespace(values=tensor[indices], indices=indices)

    with monkeypatch.context() as patch:
        patch.setattr(mergekit_sparsify.torch, "sort", sort)
        yield


def compare(ours: CheckpointReader, theirs: CheckpointReader, what: str) -> dict:
    """The max abs difference and how many entries differ (at half precision each by <= 1 ulp)."""
    assert set(ours.names) == set(theirs.names)
    worst, different, total = 0.0, 0, 0
    for name in ours.names:
        mine, other = ours.read(name), theirs.read(name)
        assert mine.dtype == other.dtype, name
        gap = (mine.float() - other.float()).abs()
        worst = max(worst, float(gap.max()))
        scale = torch.maximum(mine.float().abs(), other.float().abs())
        if mine.dtype == torch.bfloat16:
            ulp = BF16_ULP * torch.exp2(torch.floor(torch.log2(scale.clamp_min(1e-30))))
            assert bool((gap <= ulp).all()), f"{what} {name}: max difference {float(gap.max())}"
        else:
            torch.testing.assert_close(mine, other, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
                                       msg=lambda m: f"{what} {name}: {m}")
        different += int((gap > 0).sum())
        total += gap.numel()
    if ours.read(ours.names[0]).dtype == torch.bfloat16:
        assert different <= MAX_DIFFERENT * total, f"{what}: {different} of {total} entries differ"
    return {"max_abs": worst, "different": different, "total": total}


# --------------------------------------------------------------------------- registry and recipe


def test_registered_values_options_and_defaults_match_mergekit():
    for name in METHOD_NAMES:
        spec = METHODS[name]
        assert spec.needs_base and spec.paper
        assert list(spec.per_model) == ["weight", "density", third_value(name)]
        assert spec.per_model["density"].default == 1.0
    assert METHODS["della"].per_model["epsilon"].default == 0.15
    assert METHODS["breadcrumbs"].per_model["gamma"].default == 0.01
    # registry.py's della (normalize, rescale) = (True, True), della_linear (False, True), breadcrumbs* (False, False)
    assert dict(METHODS["della"].options) == {"lambda": 1.0, "normalize": True, "rescale": True, "seed": 0}
    assert dict(METHODS["della_linear"].options) == {"lambda": 1.0, "normalize": False, "rescale": True, "seed": 0}
    for name in BREADCRUMBS:
        assert dict(METHODS[name].options) == {"lambda": 1.0, "normalize": False, "rescale": False}
    from mergekit.merge_methods.registry import get

    for name in METHOD_NAMES:
        theirs = {p.name: p.default for p in get(name).spec.parameters}
        assert {"lambda", "normalize", "rescale", "density", third_value(name)} <= set(theirs)
        ours = METHODS[name]
        for key, value in {**ours.per_model, **ours.options}.items():
            if key in theirs and key != "weight":  # mergekit's weight has no default
                assert theirs[key] == (value.default if hasattr(value, "default") else value), (name, key)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_conf_lists_every_key(method):
    from evomerge.resources import CONF_DIR

    conf = yaml.safe_load((Path(CONF_DIR) / "merge" / f"{method}.yaml").read_text())
    spec = METHODS[method]
    assert conf.pop("method") == method
    assert set(conf) == set(spec.values) | set(spec.options)
    PSRecipe.from_merge_config({"method": method, **conf}, "base", ["a", "b"])


@pytest.mark.parametrize("method, values, parameters, message", [
    ("della", {"epsilon": -0.1}, {}, "epsilon for model 'a' must be in [0, 0.5], got -0.1"),
    ("della", {"epsilon": 0.6}, {}, "must be in [0, 0.5]"),
    ("della", {"density": 0.0}, {}, "density for model 'a' must be in (0, 1]"),
    ("della_linear", {"density": 1.2}, {}, "must be in (0, 1]"),
    ("della", {"epsilon": float("nan")}, {}, "must be finite"),
    ("della", {}, {"seed": -1}, "della parameter 'seed'"),
    ("della", {}, {"seed": 1.5}, "della parameter 'seed'"),
    ("della_linear", {}, {"rescale": "l1"}, "della_linear parameter 'rescale'"),
    ("della", {}, {"int8_mask": True}, "della has no parameter(s) ['int8_mask']"),
    ("breadcrumbs", {"gamma": -0.01}, {}, "gamma for model 'a' must be in [0, 1], got -0.01"),
    ("breadcrumbs_ties", {"gamma": 1.5}, {}, "must be in [0, 1]"),
    ("breadcrumbs", {"gamma": "0.1"}, {}, "must be a number"),
    ("breadcrumbs", {"density": -0.5}, {}, "must be in (0, 1]"),
    ("breadcrumbs_ties", {}, {"lambda": float("inf")}, "breadcrumbs_ties parameter 'lambda'"),
    ("breadcrumbs", {}, {"normalize": "yes"}, "breadcrumbs parameter 'normalize'"),
    ("breadcrumbs", {}, {"epsilon": 0.1}, "breadcrumbs has no parameter(s) ['epsilon']"),
    ("della", {"gamma": 0.1}, {}, "della has no per-group value(s) ['gamma']"),
])
def test_bad_values_give_one_line_recipe_errors(method, values, parameters, message):
    with pytest.raises(RecipeError) as error:
        PSRecipe.uniform(method, "base", ["a"], parameters=parameters, **values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_no_base_is_refused():
    with pytest.raises(RecipeError, match="needs a base model"):
        PSRecipe.uniform("della", None, ["a"])


# --------------------------------------------------------------------------- tensor level, against mergekit's sparsify


def tied_pair(shape, seed=4):
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    tensor = (base.float() + torch.randn(shape, generator=generator) * 1e-4).to(torch.bfloat16)
    return base, tensor


def float_pair(shape, seed=5):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, base + torch.randn(shape, generator=generator) * 0.1


def breadcrumbs_mask(base, tensor, density, gamma):
    upper, outliers = outlier_trim(base, tensor, density, gamma)
    magnitude = (tensor.float() - base.float()).abs().reshape(-1)
    position = torch.arange(magnitude.numel())

    def inside(trim):
        return (magnitude > trim.threshold) | ((magnitude == trim.threshold) & (position < trim.cut))

    return inside(upper) & ~inside(outliers), (upper, outliers)


@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.05), (0.3, 0.0), (0.6, 0.5), (0.05, 0.99),
                                            (0.2, 1.0), (1e-6, 0.01)])
@pytest.mark.parametrize("kind", ["float32", "tied_bf16"])
def test_breadcrumbs_selection_is_mergekits_except_among_ties(monkeypatch, kind, density, gamma):
    base, tensor = float_pair((300, 1000)) if kind == "float32" else tied_pair((300, 1000))
    delta = tensor.float() - base.float()
    ours, (upper, outliers) = breadcrumbs_mask(base, tensor, density, gamma)
    keep, dropped = outlier_counts(delta.numel(), density, gamma)
    # exactly `keep` entries, except that a cut at magnitude 0 keeps (upper cut) or drops (outlier cut) every
    # zero delta: the same merge, a zero adds nothing
    if 0.0 not in (upper.threshold, outliers.threshold):
        assert int(ours.sum()) == keep
    theirs = mergekit_sparsify.magnitude_outliers(delta, density, None, gamma).reshape(-1) != 0
    magnitude = delta.abs().reshape(-1)
    tied = (magnitude == upper.threshold) | (magnitude == outliers.threshold)
    nonzero = magnitude != 0
    # the same entries away from the two cuts (mergekit's mask cannot show zero deltas it keeps)
    assert torch.equal((ours & nonzero)[~tied], theirs[~tied])
    assert int((ours & nonzero & tied).sum()) == int((theirs & tied).sum())
    if kind == "tied_bf16" and 0 < dropped and keep:
        assert int(tied.sum()) > 100  # the fixture does tie at the cuts
    with mergekit_ranking_ties_by_index(monkeypatch):
        theirs = mergekit_sparsify.magnitude_outliers(delta, density, None, gamma).reshape(-1) != 0
    assert torch.equal(ours & nonzero, theirs)


@pytest.mark.parametrize("shape", [(40, 300), (1000,), (3, 50, 4), (60, 300)])
@pytest.mark.parametrize("density, epsilon", [(0.5, 0.15), (0.3, 0.25), (0.8, 0.1), (0.6, 0.0)])
@pytest.mark.parametrize("kind", ["float32", "tied_bf16"])
def test_della_probabilities_and_masks_are_mergekits_given_the_same_draws(monkeypatch, kind, shape, density, epsilon):
    """mergekit's della_magprune computes bit-equal keep probabilities; fed evomerge's draws it keeps the same
    entries and rescales them to float rounding."""
    base, tensor = float_pair(shape) if kind == "float32" else tied_pair(shape)
    delta = tensor.float() - base.float()
    key = dare_key(3, "t", 0)
    mask, factor = della_prune(base, tensor, density, epsilon, key, rescale=True)
    captured = {}

    def bernoulli(p):
        captured["p"] = p.clone()
        return (hash_draws(p.numel(), torch.tensor(key)).view(p.shape) < p).to(p.dtype)

    real_argsort = torch.argsort
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", bernoulli)
        patch.setattr(torch, "argsort", lambda t, dim=-1, descending=False, stable=False:
                      real_argsort(t, dim=dim, descending=descending, stable=True))
        theirs = mergekit_sparsify.della_magprune(delta, density, epsilon, mergekit_sparsify.RescaleNorm.l1)
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.abs().movedim(1, -1).reshape(-1, delta.shape[1])
    ours_p = keep_probabilities(rows.abs(), density, epsilon)
    if delta.dim() > 2:
        ours_p = ours_p.reshape(delta.abs().movedim(1, -1).shape).movedim(-1, 1)
    assert torch.equal(ours_p.reshape(-1), captured["p"].reshape(-1))
    assert torch.equal(mask & (delta.reshape(-1) != 0), theirs.reshape(-1) != 0)
    torch.testing.assert_close(torch.where(mask, delta.reshape(-1) * factor, 0.0), theirs.reshape(-1),
                               rtol=FLOAT32_RTOL, atol=0.0)  # the L1 sums' rounding


def test_della_ties_change_only_tied_probabilities(monkeypatch):
    """Unpatched, mergekit's unstable argsort ranks tied magnitudes in any order: the probabilities differ only
    at tied entries, by at most the spread of their ranks."""
    base, tensor = tied_pair((60, 300))
    delta = tensor.float() - base.float()
    captured = {}
    real = torch.bernoulli

    def bernoulli(p):
        captured["p"] = p.clone()
        return real(p)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", bernoulli)
        mergekit_sparsify.della_magprune(delta, 0.5, 0.15, None)
    ours = keep_probabilities(delta.abs(), 0.5, 0.15)
    magnitude = delta.abs()
    for row in range(delta.shape[0]):
        differ = ours[row] != captured["p"][row]
        values, counts = torch.unique(magnitude[row], return_counts=True)
        tied = torch.isin(magnitude[row], values[counts > 1])
        assert not bool((differ & ~tied).any())
        assert float((ours[row] - captured["p"][row]).abs().max()) <= 2 * 0.15 * int(counts.max()) / 299 + 1e-6


def test_della_epsilon_is_narrowed_where_mergekit_refuses():
    base, tensor = float_pair((20, 100))
    delta = tensor - base
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        mergekit_sparsify.della_magprune(delta, 0.1, 0.15, None)
    assert effective_epsilon(0.1, 0.15) == 0.1 and effective_epsilon(0.9, 0.3) == pytest.approx(0.1)
    key = dare_key(0, "t", 0)
    wide, _ = della_prune(base, tensor, 0.1, 0.15, key, rescale=True)
    narrow, _ = della_prune(base, tensor, 0.1, 0.1, key, rescale=True)
    assert torch.equal(wide, narrow)
    p = keep_probabilities(delta.abs(), 0.1, 0.1)
    assert float(p.min()) == 0.0 and float(p.max()) == pytest.approx(0.2)
    smallest = delta.abs().argmin(dim=1)
    assert not bool(wide.view(20, 100)[torch.arange(20), smallest].any())  # p = 0: never kept


def test_della_chunks_and_odd_shapes(monkeypatch):
    """Ranking row chunk by row chunk gives the whole tensor's masks; 0-d, single-column and >2-D tensors work."""
    base, tensor = float_pair((50, 37))
    key = dare_key(1, "x", 1)
    whole, whole_factor = della_prune(base, tensor, 0.4, 0.2, key, rescale=True)
    monkeypatch.setattr(della_module, "RANK_CHUNK", 100)  # 2 rows a chunk, 25 chunks
    chunked, chunked_factor = della_prune(base, tensor, 0.4, 0.2, key, rescale=True)
    assert torch.equal(whole, chunked) and chunked_factor == pytest.approx(whole_factor, rel=1e-12)
    for shape in [(), (7, 1), (2, 3, 4, 5)]:
        b, t = float_pair(shape)
        out = METHODS["della"](Inputs("odd", b, [t, t * 0.5]), {"weight": (1.0, 1.0), "density": (0.5, 0.5),
                                                                 "epsilon": (0.1, 0.1)}, dict(METHODS["della"].options))
        assert out.shape == b.shape and bool(torch.isfinite(out).all())
    p = keep_probabilities(torch.rand(7, 1), 0.4, 0.2)
    assert bool((p == 0.4).all())  # a row of one entry: p = density


def test_della_masks_follow_the_seed_and_do_not_change_inputs():
    base, tensor = float_pair((30, 40))
    copies = (base.clone(), tensor.clone())
    spec = METHODS["della_linear"]
    values = {"weight": (1.0,), "density": (0.5,), "epsilon": (0.1,)}
    runs = [spec(Inputs("w", base, [tensor]), values, {**spec.options, "seed": seed}) for seed in (0, 1, 0)]
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])
    assert torch.equal(base, copies[0]) and torch.equal(tensor, copies[1])


# --------------------------------------------------------------------------- whole checkpoints, against mergekit


def uniform_case(method: str, rescale: bool | None = None):
    values = {"weight": [0.7, 0.5], "density": [0.6, 0.4], third_value(method): [0.1, 0.2] if method in DELLA
              else [0.02, 0.1]}
    spec = METHODS[method]
    parameters = {"lambda": 0.9, "normalize": not spec.options["normalize"],
                  "rescale": spec.options["rescale"] if rescale is None else rescale}
    return values, parameters


@pytest.mark.parametrize("method", BREADCRUMBS)
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_equal_mergekits_tensors(checkpoints, tmp_path, monkeypatch, method, rescale):
    """A hand-written mergekit config: float32 checkpoints to float rounding, bf16 ones (mergekit ranking ties as
    evomerge) within one bf16 rounding."""
    values, parameters = uniform_case(method, rescale)
    paths = checkpoints
    half = CheckpointReader(paths["base"]).read("model.norm.weight").dtype == torch.bfloat16
    recipe = PSRecipe.uniform(method, paths["base"], [paths["expert_a"], paths["expert_b"]], parameters=parameters,
                              **values)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    with mergekit_ranking_ties_by_index(monkeypatch):
        theirs = run_mergekit(hand_config(method, paths, values, parameters, "bfloat16" if half else None),
                              tmp_path / "mergekit")
    result = compare(ours, theirs, method)
    if not rescale and not half:
        assert result["max_abs"] == 0.0  # the same float32 operations
    print(method, "rescale" if rescale else "", "bf16" if half else "f32", result)


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize("rescale", [False, True])
def test_della_equals_mergekit_fed_the_same_draws(checkpoints, tmp_path, monkeypatch, method, rescale):
    values, parameters = uniform_case(method, rescale)
    parameters["seed"] = 7
    paths = checkpoints
    half = CheckpointReader(paths["base"]).read("model.norm.weight").dtype == torch.bfloat16
    recipe = PSRecipe.uniform(method, paths["base"], [paths["expert_a"], paths["expert_b"]], parameters=parameters,
                              **values)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    mergekit_parameters = {k: v for k, v in parameters.items() if k != "seed"}
    with mergekit_with_our_draws(monkeypatch, paths, seed=7) as probabilities:
        theirs = run_mergekit(hand_config(method, paths, values, mergekit_parameters, "bfloat16" if half else None),
                              tmp_path / "mergekit")
    assert len(probabilities) == 2 * len(ours.names)  # every tensor of both models was pruned with our draws
    result = compare(ours, theirs, method)
    if not rescale and not half:
        assert result["max_abs"] == 0.0
    print(method, "rescale" if rescale else "", "bf16" if half else "f32", result)


@pytest.mark.parametrize("method", DELLA)
def test_della_at_density_one_is_deterministic_and_mergekits(checkpoints, tmp_path, method):
    """Density 1 drops nothing (and skips the rescale) in both tools: unpatched mergekit gives the same tensors."""
    paths = checkpoints
    half = CheckpointReader(paths["base"]).read("model.norm.weight").dtype == torch.bfloat16
    values = {"weight": [0.7, 0.5], "density": [1.0, 1.0], "epsilon": [0.15, 0.15]}
    parameters = {"lambda": 1.1, "normalize": True, "rescale": True}
    recipe = PSRecipe.uniform(method, paths["base"], [paths["expert_a"], paths["expert_b"]], parameters=parameters,
                              **values)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    theirs = run_mergekit(hand_config(method, paths, values, parameters, "bfloat16" if half else None),
                          tmp_path / "mergekit")
    result = compare(ours, theirs, method)
    assert result["different"] == 0


def della_statistics(base: CheckpointReader, expert: CheckpointReader, pruned, density, epsilon):
    """Per tensor: the kept count, the kept count among the upper half of ranks and the rescale factor, with their
    expectations and standard deviations from the keep probabilities.  ``pruned(name, delta)`` gives the kept
    mask and factor."""
    rows = []
    for name in base.names:
        b, e = base.read(name), expert.read(name)
        delta = e.float() - b.float()
        view = delta.abs().reshape(1, -1) if delta.dim() == 1 else delta.abs()
        p = keep_probabilities(view, density, epsilon).reshape(-1).double()
        kept, factor = pruned(name, b, e)
        delta = delta.reshape(-1)
        live = delta != 0  # a zero delta stays zero: not observable in a merged model
        kept, upper = kept & live, (p > density) & live
        magnitude = delta.abs().double()
        expected_after = float((magnitude * p).sum())
        rows.append({"name": name, "kept": int(kept.sum()), "kept_expected": float(p[live].sum()),
                     "kept_sd": math.sqrt(float((p * (1 - p))[live].sum())),
                     "upper": int(kept[upper].sum()), "upper_expected": float(p[upper].sum()),
                     "upper_sd": math.sqrt(float((p * (1 - p))[upper].sum())),
                     "factor": factor, "factor_expected": float(magnitude.sum()) / expected_after,
                     "factor_sd": math.sqrt(float((magnitude**2 * p * (1 - p)).sum())) / expected_after})
    return rows


def test_della_without_shared_draws_agrees_in_distribution(tiny_checkpoints, tied_bf16, tmp_path):
    """Real torch.bernoulli vs evomerge's draws, one model, della_linear with weight 1 (so mergekit's merged - base
    is the pruned, rescaled task vector, read back from a float32 output): in total and in the upper half of ranks
    both tools keep the expected shares (within 5 binomial sigmas), and every large tensor's rescale factors
    agree with each other and with the expected L1 ratio within 5 sigmas."""
    density, epsilon, seed = 0.4, 0.2, 3
    for label, paths in (("f32", tiny_checkpoints), ("bf16", tied_bf16)):
        recipe = PSRecipe.uniform("della_linear", paths["base"], [paths["expert_a"]], weight=1.0, density=density,
                                  epsilon=epsilon, parameters={"seed": seed})
        torch.manual_seed(0)
        config = mergekit_config(recipe)
        config.pop("out_dtype", None)
        merged = run_mergekit(config, tmp_path / f"mergekit_{label}")
        base, expert = CheckpointReader(paths["base"]), CheckpointReader(paths["expert_a"])

        def ours(name, b, e):
            mask, factor = della_prune(b, e, density, epsilon, dare_key(seed, name, 0), rescale=True)
            return mask, factor

        def theirs(name, b, e):
            delta = (e.float() - b.float()).reshape(-1)
            change = (merged.read(name).float() - b.float()).reshape(-1)
            kept = (change != 0) & (delta != 0)
            return kept, float((change[kept] / delta[kept]).median())

        ours_stats = della_statistics(base, expert, ours, density, epsilon)
        theirs_stats = della_statistics(base, expert, theirs, density, epsilon)
        for key in ("kept", "upper"):
            expected = sum(row[f"{key}_expected"] for row in ours_stats)
            sd = math.sqrt(sum(row[f"{key}_sd"] ** 2 for row in ours_stats))
            for who, stats in (("evomerge", ours_stats), ("mergekit", theirs_stats)):
                observed = sum(row[key] for row in stats)
                assert abs(observed - expected) <= SIGMAS * sd, \
                    f"{label} {who} {key}: {observed} vs {expected:.0f} +- {sd:.0f}"
        total = sum(row["kept_expected"] for row in ours_stats)
        upper = sum(row["upper_expected"] for row in ours_stats)
        assert upper / total > 0.5 + epsilon / 4  # larger magnitudes are kept more often
        checked = 0
        for mine, other in zip(ours_stats, theirs_stats):
            if mine["kept_expected"] < 400:
                continue
            checked += 1
            bound = SIGMAS * mine["factor_sd"]
            assert abs(math.log(mine["factor"] / other["factor"])) <= math.sqrt(2) * bound, mine["name"]
            for factor in (mine["factor"], other["factor"]):
                assert abs(math.log(factor / mine["factor_expected"])) <= bound, mine["name"]
        assert checked >= 4


# --------------------------------------------------------------------------- exported per-layer-group configs


@pytest.mark.parametrize("method", BREADCRUMBS)
def test_exported_breadcrumbs_config_rebuilds_the_merge(checkpoints, tmp_path, monkeypatch, method):
    parameters = {"rescale": True, "lambda": 0.8} if method == "breadcrumbs" else {"normalize": True}
    recipe = per_group_recipe(method, checkpoints, **parameters)
    half = CheckpointReader(checkpoints["base"]).read("model.norm.weight").dtype == torch.bfloat16
    text, notes = mergekit_yaml(recipe)
    assert len(notes) == half and (not half or "tied at a cut" in notes[0])
    config = yaml.safe_load(text)
    assert config["merge_method"] == method and config["parameters"]["rescale"] == parameters.get("rescale", False)
    assert isinstance(config["models"][0]["parameters"]["gamma"], list)  # per-group values
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    with mergekit_ranking_ties_by_index(monkeypatch):
        theirs = run_mergekit(config, tmp_path / "mergekit")
    print(method, "bf16" if half else "f32", compare(ours, theirs, method))
    if not half:
        return
    # mergekit's own (unstable) sort: entries differ only where a model's magnitude ties at one of its cuts
    theirs = run_mergekit(config, tmp_path / "mergekit_unpatched")
    base = CheckpointReader(checkpoints["base"])
    models = [CheckpointReader(checkpoints[key]) for key in ("expert_a", "expert_b")]
    from evomerge.merge.stream import check_recipe_fits

    assignment = check_recipe_fits(recipe, ours.names)
    differing = 0
    for name in ours.names:
        differ = (ours.read(name) != theirs.read(name)).reshape(-1)
        group = recipe.groups[assignment[name]]
        at_cut = torch.zeros_like(differ)
        for index, model in enumerate(models):
            b, t = base.read(name), model.read(name)
            _, (upper, outliers) = breadcrumbs_mask(b, t, group["density"][index], group["gamma"][index])
            magnitude = (t.float() - b.float()).abs().reshape(-1)
            at_cut |= (magnitude == upper.threshold) | (magnitude == outliers.threshold)
        assert not bool((differ & ~at_cut).any()), name
        differing += int(differ.sum())
    print(method, "unpatched bf16: entries differing", differing)


@pytest.mark.parametrize("method", DELLA)
def test_exported_della_config_rebuilds_the_merge_given_the_same_draws(checkpoints, tmp_path, monkeypatch, method):
    recipe = per_group_recipe(method, checkpoints, seed=5, **({"rescale": False} if method == "della" else {}))
    half = CheckpointReader(checkpoints["base"]).read("model.norm.weight").dtype == torch.bfloat16
    text, notes = mergekit_yaml(recipe)
    assert "drop masks differ" in notes[0] and len(notes) == 1 + half
    config = yaml.safe_load(text)
    assert "seed" not in config["parameters"] and isinstance(config["models"][1]["parameters"]["epsilon"], list)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    with mergekit_with_our_draws(monkeypatch, checkpoints, seed=5):
        theirs = run_mergekit(config, tmp_path / "mergekit")
    print(method, "bf16" if half else "f32", compare(ours, theirs, method))


def test_notes_name_groups_mergekit_would_refuse(tiny_checkpoints):
    paths = tiny_checkpoints
    recipe = PSRecipe(method="della", base=str(paths["base"]), models=(str(paths["expert_a"]),), groups=(
        GroupValues("embed", {"density": 0.1, "epsilon": 0.15}), GroupValues("blocks.0", {"density": 0.5}),
        GroupValues("blocks.1", {"density": 1.0, "epsilon": 0.5}),
        GroupValues("head", {"density": 0.9, "epsilon": 0.1})))
    notes = mergekit_notes(recipe)
    assert any("['embed', 'head']" in note and "refuses" in note for note in notes)
    merger = InMemoryMerger(paths["base"], [paths["expert_a"]])
    merger.merge(recipe)  # evomerge merges it (finite tensors, or MergeError)


# --------------------------------------------------------------------------- both merge paths, and the search


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_in_memory_candidate_equals_disk_merge_bit_for_bit(checkpoints, tmp_path, method):
    recipes = [per_group_recipe(method, checkpoints),
               per_group_recipe(method, checkpoints, rescale=method in BREADCRUMBS, normalize=True, **{"lambda": 1.2})]
    merger = InMemoryMerger(checkpoints["base"], [checkpoints["expert_a"], checkpoints["expert_b"]])
    for index, recipe in enumerate(recipes):
        state = merger.merge(recipe).state_dict()
        disk = CheckpointReader(merge_to_disk(recipe, tmp_path / f"merged{index}"))
        for name in disk.names:
            assert state[name].dtype == disk.read(name).dtype
            assert torch.equal(state[name], disk.read(name)), name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_decoded_genome_is_a_valid_finite_merge(tiny_checkpoints, method):
    paths = tiny_checkpoints
    models = (str(paths["expert_a"]), str(paths["expert_b"]))
    space = PSGenomeSpace(method=method, base=str(paths["base"]), models=models, groups=GROUPS)
    merger = InMemoryMerger(paths["base"], [paths["expert_a"], paths["expert_b"]])
    rng = np.random.default_rng(0)
    points = [np.zeros(space.dim), np.ones(space.dim)] + [rng.random(space.dim) for _ in range(48)]
    for point in points:
        recipe = space.decode(point)
        assert PSRecipe.from_dict(recipe.to_dict()).hash == recipe.hash
        if method in DELLA:  # every point of the box is a config mergekit accepts
            for group in recipe.groups:
                for density, epsilon in zip(group["density"], group["epsilon"]):
                    assert 0 < density - epsilon and density + epsilon < 1, (density, epsilon)
            assert not any("refuses" in note for note in mergekit_notes(recipe))
        model = merger.merge(recipe)  # raises MergeError on a non-finite tensor
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_mergekit_accepts_the_corners_of_della_box(tiny_checkpoints, tmp_path):
    paths = tiny_checkpoints
    space = PSGenomeSpace(method="della", base=str(paths["base"]), models=(str(paths["expert_a"]),), groups=GROUPS)
    low, high = space.decode(np.zeros(space.dim)), space.decode(np.ones(space.dim))
    assert low.groups[0]["density"] == (0.25,) and low.groups[0]["epsilon"] == (0.0,)
    assert high.groups[0]["density"] == (0.75,) and high.groups[0]["epsilon"] == (0.2,)
    # the extreme corner (density 0.25 or 0.75 with epsilon 0.2) runs in mergekit
    corner = PSRecipe.uniform("della", paths["base"], [paths["expert_a"], paths["expert_b"]],
                              density=[0.25, 0.75], epsilon=[0.2, 0.2])
    run_mergekit(mergekit_config(corner), tmp_path / "corner")
