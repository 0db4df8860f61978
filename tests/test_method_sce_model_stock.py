"""sce and model_stock: the same tensors as mergekit 0.1.5 (float32 on the tiny checkpoints, bf16 on tiny bf16
checkpoints, by hand-written and by exported per-layer-group configs), in memory == on disk bit for bit, a
searchable sce genome that always decodes to a valid recipe, and model_stock refused by the search (nothing to
search) but merged by `evomerge merge`.

Tolerances.  Both methods are deterministic.  evomerge sums the norms, dot products and mean squares that set a
tensor's coefficients (model_stock's t, sce's weights) in float64 where mergekit sums in float32, so a coefficient
can differ in its last float32 bits and a merged float32 entry by a few float32 ulps of the terms it sums: within
`assert_float32_close` (2^-20 relative, or 2^-20 of the tensor's largest entry where the sum cancels; measured:
at most 3.2 x 2^-24 of it).  Written in bf16 that is the same bf16 value except where the float32 result lies
next to a bf16 rounding midpoint (model_stock averages the models, and two bf16 values average to a midpoint), so
bf16 entries may differ by one bf16 ulp, in at most `MAX_DIFFERENT_BF16` of the entries (measured: none on
`bf16_pool`; 0.1-0.2% of the entries of model_stock merges of bf16 tensors moved by N(0, 0.02^2), whose float32
results differ in many last bits).  sce's selection ranks the same float32 variances in both tools (Welford's in
float64 rounded to float32 is what torch.var computes on the CPU); among variances equal to the k-th largest
evomerge keeps the lowest indices and mergekit what torch.topk returns, so the comparisons with mergekit's merge
run its selection with a stable sort, and `test_top_variance_agrees_with_mergekit_except_among_ties` compares
the selections themselves (unpatched, mergekit's bf16 sce merges of `bf16_pool` differ in 2.2% of the entries).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import bf16_differences, bf16_pool as build_bf16_pool, run_mergekit
from evomerge.cli import main
from evomerge.errors import MergeError, RecipeError
from evomerge.export import mergekit_config, mergekit_notes
from evomerge.merge.command import merge_command
from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.methods import METHODS, all_finite, kernels
from evomerge.merge.methods import model_stock as model_stock_module
from evomerge.merge.methods import sce as sce_module
from evomerge.merge.methods.model_stock import model_stock
from evomerge.merge.methods.sce import sce, sce_weights, top_variance
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader
from evomerge.recipe import GroupValues, PSRecipe
from evomerge.resources import CONF_DIR
from evomerge.search.genome import PSGenomeSpace

mergekit_sce = pytest.importorskip("mergekit.merge_methods.sce", reason="mergekit (a dev extra) is not installed")
mergekit_stock = pytest.importorskip("mergekit.merge_methods.model_stock", reason="mergekit is not installed")

GROUPS = ("embed", "blocks.0", "blocks.1", "head")
TOPKS = (0.2, 0.5, 0.8, 0.35)  # sce's select_topk per layer group
FLOAT32_RTOL = 2.0**-20  # 8 float32 ulps
MAX_DIFFERENT_BF16 = 1e-4  # of a checkpoint's entries (measured: 0 on this fixture, for both methods)


@pytest.fixture(scope="module")
def bf16_pool(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base and three fine-tunes sharing a direction (N(0, 1e-4)) plus their own moves (N(0, 1e-4),
    N(0, 2e-4), N(0, 1.5e-3)): deltas of a few bf16 ulps, so variances tie a lot; with expert_c the task vectors'
    mean squares sum above 1e-6 (sce weights by them), without it below (equal weights)."""
    return build_bf16_pool(tmp_path_factory.mktemp("bf16_pool"),
                           {"base": None, "expert_a": 1e-4, "expert_b": 2e-4, "expert_c": 1.5e-3}, shared_std=1e-4)


def stable_sce_mask(tvs, density, mask_dtype=None):
    """mergekit 0.1.5's `sce_mask` with a stable sort: among equal variances the lowest indices win."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k:
        mask.view(-1)[torch.argsort(var.reshape(-1), descending=True, stable=True)[:k]] = 1
    return mask


def mergekit_sce_tensor(base, tensors, select_topk, stable=True):
    """mergekit's own sce merge of one tensor (its kernel on float32 inputs, as its float32 merge runs it)."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    group = TensorGroup((TensorEntry("base", base.float(), True),
                         *(TensorEntry(index, tensor.float()) for index, tensor in enumerate(tensors))))
    with pytest.MonkeyPatch.context() as patch:
        if stable:
            patch.setattr(mergekit_sce, "sce_mask", stable_sce_mask)
        return mergekit_sce.sce_merge.implementation(group, select_topk=select_topk)


def mergekit_stock_tensor(base, tensors, filter_wise):
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    group = TensorGroup((TensorEntry("base", base.float(), True),
                         *(TensorEntry(index, tensor.float()) for index, tensor in enumerate(tensors))))
    return mergekit_stock.model_stock_merge_method.implementation(group, filter_wise=filter_wise)


def sce_recipe(paths, models=("expert_a", "expert_b"), topks=TOPKS) -> PSRecipe:
    return PSRecipe("sce", tuple(str(paths[m]) for m in models),
                    tuple(GroupValues(name, {"select_topk": topk}) for name, topk in zip(GROUPS, topks)),
                    str(paths["base"]))


def stock_recipe(paths, models=("expert_a", "expert_b"), filter_wise=False) -> PSRecipe:
    return PSRecipe.uniform("model_stock", paths["base"], [paths[m] for m in models], groups=GROUPS,
                            parameters={"filter_wise": filter_wise})


def assert_float32_close(ours: torch.Tensor, theirs: torch.Tensor, label: str) -> None:
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    torch.testing.assert_close(ours, theirs, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * scale,
                               msg=lambda message: f"{label}: {message}")


def compare_float32(ours: CheckpointReader, theirs: CheckpointReader, label: str) -> None:
    assert set(ours.names) == set(theirs.names)
    for name in ours.names:
        assert_float32_close(ours.read(name), theirs.read(name), f"{label} {name}")


# --------------------------------------------------------------------------- against mergekit


@pytest.mark.parametrize("method, options, mergekit_parameters", [
    ("sce", {"select_topk": 1.0}, {}),
    ("sce", {"select_topk": 0.3}, {"select_topk": 0.3}),
    ("sce", {"select_topk": 0.05}, {"select_topk": 0.05}),
    ("model_stock", {}, {}),
    ("model_stock", {"parameters": {"filter_wise": True}}, {"filter_wise": True}),
])
def test_same_tensors_as_mergekit_at_float32(tiny_checkpoints, tmp_path, method, options, mergekit_parameters):
    """A hand-written mergekit config of the same merge (float32 checkpoints: no tied variances to break)."""
    base, first, second = (str(tiny_checkpoints[key]) for key in ("base", "expert_a", "expert_b"))
    recipe = PSRecipe.uniform(method, base, [first, second], **options)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "evomerge"))
    config = {"merge_method": method, "base_model": base, "models": [{"model": first}, {"model": second}],
              "parameters": mergekit_parameters, "dtype": "float32"}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    compare_float32(ours, theirs, method)
    if method == "sce" and options["select_topk"] < 1:  # the selection really drops entries
        name = "model.layers.0.mlp.up_proj.weight"
        assert float((ours.read(name) == CheckpointReader(base).read(name)).float().mean()) > 0.5


@pytest.mark.parametrize("method", ["sce", "model_stock"])
def test_mergekit_rebuilds_the_exported_config_at_float32(tiny_checkpoints, tmp_path, method):
    recipe = (sce_recipe(tiny_checkpoints) if method == "sce"
              else stock_recipe(tiny_checkpoints, filter_wise=True))
    assert mergekit_notes(recipe) == []
    config = mergekit_config(recipe)
    if method == "sce":
        assert isinstance(config["parameters"]["select_topk"], list)  # per-group values, filtered by group
        assert all("parameters" not in entry for entry in config["models"])
    else:
        assert config["parameters"] == {"filter_wise": True}
    compare_float32(CheckpointReader(merge_to_disk(recipe, tmp_path / "ours")),
                    run_mergekit(config, tmp_path / "mergekit"), method)


@pytest.mark.parametrize("method, models, option", [
    ("sce", ("expert_a", "expert_b"), None),  # mean squares sum below 1e-6: equal weights
    ("sce", ("expert_a", "expert_b", "expert_c"), None),  # weighted by mean squares
    ("model_stock", ("expert_a", "expert_b"), False),
    ("model_stock", ("expert_a", "expert_b", "expert_c"), False),
    ("model_stock", ("expert_a", "expert_b", "expert_c"), True),
])
def test_mergekit_rebuilds_the_exported_config_at_bf16(bf16_pool, tmp_path, monkeypatch, method, models, option):
    """The exported per-layer-group config, rebuilt by mergekit (its sce selection sorting stably, evomerge's
    rule among tied variances): every entry within one bf16 ulp, few entries differing at all."""
    monkeypatch.setattr(mergekit_sce, "sce_mask", stable_sce_mask)
    recipe = (sce_recipe(bf16_pool, models) if method == "sce"
              else stock_recipe(bf16_pool, models, filter_wise=option))
    notes = mergekit_notes(recipe)
    assert len(notes) == (method == "sce") and all("torch.topk" in note for note in notes)
    config = mergekit_config(recipe)
    assert config["out_dtype"] == "bfloat16" and config["merge_method"] == method
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours"))
    different, total = bf16_differences(ours, run_mergekit(config, tmp_path / "mergekit"), method)
    assert different <= MAX_DIFFERENT_BF16 * total, f"{method}: {different} of {total} entries differ"


@pytest.mark.parametrize("models", [("expert_a", "expert_b"), ("expert_a", "expert_b", "expert_c")])
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1, 0.001])
def test_sce_tensor_for_tensor_at_bf16(bf16_pool, models, select_topk):
    """Each bf16 tensor against mergekit's sce kernel with a stable selection: the float32 merges within a few
    float32 ulps (equal where the weights are equal), and the same bf16 values but for the rare midpoint."""
    base = CheckpointReader(bf16_pool["base"])
    readers = [CheckpointReader(bf16_pool[model]) for model in models]
    different = total = 0
    for name in base.names:
        tensors = [reader.read(name) for reader in readers]
        ours = sce(base.read(name).float(), [t.float() for t in tensors], select_topk)  # float32: to see the gap
        theirs = mergekit_sce_tensor(base.read(name), tensors, select_topk)
        assert_float32_close(ours, theirs, name)
        if len(models) == 2:  # equal weights 1/2: the same float32 operations on the same numbers
            assert torch.equal(ours, theirs), name
        different += int((ours.to(torch.bfloat16) != theirs.to(torch.bfloat16)).sum())
        total += ours.numel()
    assert different <= MAX_DIFFERENT_BF16 * total


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_tensor_for_tensor_at_bf16(bf16_pool, filter_wise):
    base = CheckpointReader(bf16_pool["base"])
    readers = [CheckpointReader(bf16_pool[model]) for model in ("expert_a", "expert_b", "expert_c")]
    for name in base.names:
        tensors = [reader.read(name).float() for reader in readers]
        ours = model_stock(base.read(name).float(), tensors, filter_wise=filter_wise)
        theirs = mergekit_stock_tensor(base.read(name), tensors, filter_wise)
        assert_float32_close(ours, theirs, name)


def test_top_variance_agrees_with_mergekit_except_among_ties():
    """mergekit 0.1.5's `sce_mask` (torch.topk) against evomerge's selection on bf16 task vectors that tie a lot:
    the same number of entries, every entry above the k-th largest variance, none below it; only which of the
    entries tied at it are kept may differ (evomerge: the lowest indices)."""
    generator = torch.Generator().manual_seed(4)
    base = (torch.randn(300, 1000, generator=generator) * 0.02).to(torch.bfloat16)
    tensors = [(base.float() + torch.randn(300, 1000, generator=generator) * 1e-4 * (1 + i)).to(torch.bfloat16)
               for i in range(2)]
    tvs = torch.stack([t.float() - base.float() for t in tensors])
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    tied_choices = 0
    for density in (0.05, 0.2, 0.5, 0.8):
        theirs = mergekit_sce.sce_mask(tvs, density, torch.float32).reshape(-1).bool()
        selection = top_variance(base, tensors, density)
        position = torch.arange(var.numel())
        ours = (var > selection.threshold) | ((var == selection.threshold) & (position < selection.cut))
        assert int(ours.sum()) == int(theirs.sum()) == int(torch.count_nonzero(var) * density)
        assert torch.equal(ours & (var != selection.threshold), theirs & (var != selection.threshold))
        assert float(var[theirs].min()) == selection.threshold  # mergekit's cut is the same variance
        assert int((var == selection.threshold).sum()) > 10 * int((ours != theirs).sum() > 0)
        tied_choices += int((ours != theirs).sum())
        assert torch.equal(ours, stable_sce_mask(tvs, density).reshape(-1).bool())
    assert tied_choices > 0  # the fixture does tie, and the two tools do choose differently among ties


def test_top_variance_edges():
    base = torch.zeros(10)
    same = [torch.ones(10), torch.ones(10)]  # variance 0 everywhere: nothing to select
    assert top_variance(base, same, 0.5).cut == 0
    assert torch.equal(sce(base, same, 0.5), base)
    assert torch.equal(sce(base, same, 1.0), torch.ones(10))  # no selection: the agreeing mean
    spread = [torch.arange(10.0), -torch.arange(10.0)]  # variances 0, 1, 4, ...: one zero
    assert top_variance(base, spread, 0.1).cut == 0  # int(9 * 0.1) = 0 entries: the base
    assert torch.equal(sce(base, spread, 0.1), base)
    selection = top_variance(base, spread, 0.34)  # int(9 * 0.34) = 3: the 3 largest
    assert selection.threshold == 49.0 and selection.cut == 10
    expected = torch.tensor([0.0] * 7 + [7.0, 8.0, 9.0])  # the 3 kept sum to 0: + elected, the first model's
    assert torch.equal(sce(base, spread, 0.34), expected)
    assert torch.equal(mergekit_sce_tensor(base, spread, 0.34, stable=False), expected)
    tied = [torch.ones(10), -torch.ones(10)]  # every variance 1: the first k by index
    assert top_variance(base, tied, 0.45) == sce_module.Selection(1.0, 4)
    assert top_variance(base, spread, 1.0) is None
    assert torch.equal(sce(torch.zeros(0), [torch.zeros(0)], 0.5), torch.zeros(0))


def test_sce_weights_follow_mergekit():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(1000, generator=generator)
    small = [base + torch.randn(1000, generator=generator) * s for s in (1e-4, 3e-4)]  # sum of mean squares 1e-7
    large = [base + torch.randn(1000, generator=generator) * s for s in (0.01, 0.03)]
    assert sce_weights(base, small, None) == [0.5, 0.5]
    ours = sce_weights(base, large, None)
    theirs = mergekit_sce.sce_weight(torch.stack([t - base for t in large]))
    assert ours == pytest.approx(theirs.tolist(), rel=1e-6) and ours[1] > 8 * ours[0]


def test_chunked_passes_give_the_same_tensors(monkeypatch):
    """Big tensors are walked in chunks; small chunks here (the tie search crossing chunks) give the same bits."""
    generator = torch.Generator().manual_seed(2)
    base = (torch.randn(60, 170, generator=generator) * 0.02).to(torch.bfloat16)
    tensors = [(base.float() + torch.randn(60, 170, generator=generator) * 2e-4).to(torch.bfloat16) for _ in range(3)]
    whole = {density: sce(base, tensors, density) for density in (1.0, 0.5, 0.07)}
    stock = {fw: model_stock(base, tensors, filter_wise=fw) for fw in (False, True)}
    monkeypatch.setattr(sce_module, "BITS_CHUNK", 333)
    monkeypatch.setattr(model_stock_module, "BITS_CHUNK", 333)
    for density, expected in whole.items():  # written into NaNs: every chunk is written
        assert torch.equal(sce(base, tensors, density, out=torch.full_like(base, math.nan)), expected), density
    for fw, expected in stock.items():
        merged = model_stock(base, tensors, filter_wise=fw, out=torch.full_like(base, math.nan))
        assert torch.equal(merged, expected), fw


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    """Tensors of 2^16 entries and more run through torch.compile (in chunks of 2^21): the same results."""
    size = kernels.BITS_CHUNK + 4 * kernels.COMPILE_MIN_NUMEL + 7
    generator = torch.Generator().manual_seed(3)
    base = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
    tensors = [(base.float() + torch.randn(size, generator=generator) * 2e-3).to(torch.bfloat16) for _ in range(3)]
    cases = {
        "sce": lambda: sce(base, tensors, 1.0),
        "sce_topk": lambda: sce(base, tensors, 0.3),
        "model_stock": lambda: model_stock(base, tensors),
        "model_stock_rows": lambda: model_stock(base[:-7].reshape(-1, 64), [t[:-7].reshape(-1, 64) for t in tensors],
                                                filter_wise=True),
    }
    compiled = {name: run() for name, run in cases.items()}
    monkeypatch.setattr(kernels, "_compile_enabled", False)
    for name, run in cases.items():
        assert torch.equal(compiled[name], run()), name


# --------------------------------------------------------------------------- both merge paths


@pytest.mark.parametrize("method", ["sce", "model_stock", "model_stock_filter_wise"])
@pytest.mark.parametrize("pool", ["float32", "bf16"])
def test_in_memory_candidate_equals_disk_merge(tiny_checkpoints, bf16_pool, tmp_path, method, pool):
    paths = tiny_checkpoints if pool == "float32" else bf16_pool
    models = ("expert_a", "expert_b") if pool == "float32" else ("expert_a", "expert_b", "expert_c")
    recipe = (sce_recipe(paths, models) if method == "sce"
              else stock_recipe(paths, models, filter_wise=method.endswith("filter_wise")))
    merger = InMemoryMerger(paths["base"], [paths[m] for m in models])
    state = merger.merge(recipe).state_dict()
    disk = CheckpointReader(merge_to_disk(recipe, tmp_path / "merged"))
    for name in disk.names:
        assert state[name].dtype == disk.read(name).dtype
        assert torch.equal(state[name], disk.read(name)), name


# --------------------------------------------------------------------------- search, recipes, errors


def test_sce_genome_always_decodes_to_a_valid_recipe(bf16_pool):
    models = tuple(str(bf16_pool[m]) for m in ("expert_a", "expert_b", "expert_c"))
    space = PSGenomeSpace(method="sce", base=str(bf16_pool["base"]), models=models, groups=GROUPS)
    assert space.dim == len(GROUPS) and space.describe() == [f"{g}/select_topk" for g in GROUPS]
    merger = InMemoryMerger(bf16_pool["base"], list(models))
    rng = np.random.default_rng(0)
    points = [np.zeros(space.dim), np.ones(space.dim), *rng.random((48, space.dim))]
    for point in points:
        recipe = space.decode(point)
        assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe
        assert all(0.1 <= group["select_topk"] <= 1.0 for group in recipe.groups)
        model = merger.merge(recipe)
        assert all(all_finite(tensor) for tensor in model.state_dict().values())
    assert space.decode(space.encode({"select_topk": 1.0})).groups[0]["select_topk"] == 1.0
    PSGenomeSpace(method="sce", base="b", models=("m",), groups=GROUPS, ranges={"select_topk": (1e-3, 1.0)})
    with pytest.raises(MergeError, match=r"select_topk must lie in \(0, 1\]"):
        PSGenomeSpace(method="sce", base="b", models=("m",), groups=GROUPS, ranges={"select_topk": (0.0, 1.0)})


def test_model_stock_has_nothing_to_search():
    spec = METHODS["model_stock"]
    assert not spec.values and spec.n_models == (2, None) and spec.needs_base
    with pytest.raises(MergeError) as error:
        PSGenomeSpace(method="model_stock", base="b", models=("m1", "m2"), groups=GROUPS)
    assert "model_stock has no values to search" in str(error.value) and "\n" not in str(error.value)


def test_search_refuses_model_stock_in_one_line(tiny_checkpoints, tmp_path, capsys):
    """`evomerge search merge=model_stock` on the tiny checkpoints: one error line, before any model is loaded."""
    base, first, second = (tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b"))
    with pytest.raises(SystemExit) as stop:
        main(["search", "pool.zoo=false", f"pool.base='{base}'", f"pool.models=['{first}','{second}']",
              "progress=false", "merge=model_stock", f"hydra.run.dir={tmp_path / 'run'}"])
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model_stock has no values to search" in lines[0], lines


def test_merge_command_runs_model_stock_from_its_config(tiny_checkpoints, tmp_path):
    conf = yaml.safe_load((CONF_DIR / "merge" / "model_stock.yaml").read_text())
    assert conf == {"method": "model_stock", "filter_wise": False}
    cfg = OmegaConf.create({"merge": conf, "base": str(tiny_checkpoints["base"]),
                            "models": [str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"])],
                            "out": str(tmp_path / "merged")})
    merge_command(cfg)
    recipe = PSRecipe.load(tmp_path / "merged" / "evomerge_recipe.yaml")
    assert recipe.method == "model_stock" and recipe.parameters == {"filter_wise": False}
    assert all(dict(group.values) == {} for group in recipe.groups)
    expected = CheckpointReader(merge_to_disk(stock_recipe(tiny_checkpoints), tmp_path / "direct"))
    merged = CheckpointReader(tmp_path / "merged")
    assert all(torch.equal(merged.read(name), expected.read(name)) for name in expected.names)


def test_configs_list_every_key():
    for name in ("sce", "model_stock"):
        conf = yaml.safe_load((CONF_DIR / "merge" / f"{name}.yaml").read_text())
        spec = METHODS[name]
        assert set(conf) == {"method", *spec.values, *spec.options}
    assert yaml.safe_load((CONF_DIR / "merge" / "sce.yaml").read_text()) == {"method": "sce", "select_topk": 1.0}
    assert METHODS["sce"].per_group["select_topk"].default == 1.0 and not METHODS["sce"].options


@pytest.mark.parametrize("method, kwargs, message", [
    ("sce", {"select_topk": 0}, "group 'embed': select_topk must be in (0, 1], got 0"),
    ("sce", {"select_topk": 1.5}, "select_topk must be in (0, 1], got 1.5"),
    ("sce", {"select_topk": -0.2}, "select_topk must be in (0, 1], got -0.2"),
    ("sce", {"select_topk": math.nan}, "select_topk must be finite"),
    ("sce", {"select_topk": "0.5"}, "select_topk must be a number"),
    ("sce", {"select_topk": [0.5, 0.5]}, "select_topk must be a number"),
    ("sce", {"parameters": {"int8_mask": True}}, "sce has no parameter(s) ['int8_mask']; it takes none"),
    ("sce", {"weight": 1.0}, "sce has no per-group value(s) ['weight']"),
    ("sce", {"base": None}, "sce needs a base model"),
    ("model_stock", {"models": 1}, "model_stock merges 2 to any number of models, recipe lists 1"),
    ("model_stock", {"base": None}, "model_stock needs a base model"),
    ("model_stock", {"parameters": {"filter_wise": "yes"}}, "model_stock parameter 'filter_wise'"),
    ("model_stock", {"parameters": {"filter_wise": 1}}, "model_stock parameter 'filter_wise'"),
    ("model_stock", {"weight": [0.5, 0.5]}, "model_stock has no per-group value(s) ['weight']"),
])
def test_bad_values_give_one_line(method, kwargs, message):
    kwargs = dict(kwargs)
    base = kwargs.pop("base", "base")
    models = ["a", "b"][:kwargs.pop("models", 2)]
    with pytest.raises(RecipeError) as error:
        PSRecipe.uniform(method, base, models, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
