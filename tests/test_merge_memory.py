"""In-memory candidate merging: bit-for-bit equal to the disk path, in place, over a fixed model pool."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.memory import InMemoryMerger
from evomerge.errors import MergeError
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader, load_model, load_tokenizer
from evomerge.merge.methods import METHODS
from evomerge.recipe import PSRecipe

PROMPTS = ["Question: Tom has 12 apples. He gets 9 more.", "問題：太郎はりんごを3個持っています。"]


def recipe_for(method, paths, tmp_path):
    """A recipe with different values in every layer group, so group lookup is exercised too."""
    base, models = paths["base"], [paths["expert_a"], paths["expert_b"]]
    groups = ["embed", "blocks.0", "blocks.1", "head"]
    values = {
        "linear": lambda i: {"weight": [0.3 + 0.1 * i, 0.7]},
        "task_arithmetic": lambda i: {"weight": [0.5, 0.2 * i]},
        "ties": lambda i: {"weight": [0.6, 0.4 + 0.1 * i], "density": [0.2 + 0.2 * i, 0.5]},
        "dare_ties": lambda i: {"weight": [0.6, 0.4], "density": [0.9 - 0.2 * i, 0.5]},
        "dare_linear": lambda i: {"weight": [0.6, 0.4], "density": [0.3, 0.3 + 0.2 * i]},
        "slerp": lambda i: {"t": 0.2 * i},
        "fisher": lambda i: {"weight": [1.0, 0.5 + i]},
        "regmean": lambda i: {"weight": [1.0, 0.5 + i]},
    }.get(method, lambda i: spread_values(METHODS[method], i))
    parameters = {}
    if method in ("fisher", "regmean"):
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS))
        parameters = {"prompts": str(prompts), "statistics_dir": str(tmp_path / "stats")}
    if method == "dare_linear":
        parameters = {"rescale": "l1", "seed": 11}
    return PSRecipe(
        method=method,
        base=str(base) if METHODS[method].takes_base else None,
        models=tuple(str(model) for model in models),
        groups=tuple({"name": name, **values(index)} for index, name in enumerate(groups)),
        parameters=parameters,
    )


def spread_values(spec, group: int) -> dict:
    """Values inside the method's search ranges that differ between groups and models."""
    def at(value, share):
        low, high = value.search
        return low + (high - low) * min(share, 0.95)
    values = {key: [at(value, 0.3 + 0.1 * group + 0.2 * model) for model in range(2)]
              for key, value in spec.per_model.items()}
    values.update({key: at(value, 0.2 + 0.2 * group) for key, value in spec.per_group.items()})
    return values


@pytest.fixture(scope="module")
def merger(tiny_checkpoints):
    return InMemoryMerger(tiny_checkpoints["base"], [tiny_checkpoints["expert_a"], tiny_checkpoints["expert_b"]])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_candidate_equals_disk_merge_bit_for_bit(merger, tiny_checkpoints, tmp_path, method):
    recipe = recipe_for(method, tiny_checkpoints, tmp_path)
    model = merger.merge(recipe)
    disk = CheckpointReader(merge_to_disk(recipe, tmp_path / "merged"))
    state = model.state_dict()
    assert set(disk.names) <= set(state)
    for name in disk.names:
        assert torch.equal(state[name], disk.read(name)), name


def test_candidates_write_into_the_same_resident_parameters(merger, tiny_checkpoints, tmp_path):
    pointers = {name: parameter.data_ptr() for name, parameter in merger.model.named_parameters()}
    first = recipe_for("ties", tiny_checkpoints, tmp_path)
    merger.merge(first)
    snapshot = {name: tensor.clone() for name, tensor in merger.model.state_dict().items()}
    merger.merge(recipe_for("dare_ties", tiny_checkpoints, tmp_path))
    assert merger.merge(first) is merger.model
    assert {name: parameter.data_ptr() for name, parameter in merger.model.named_parameters()} == pointers
    for name, tensor in merger.model.state_dict().items():
        assert torch.equal(tensor, snapshot[name])


def test_recipe_may_use_a_subset_of_the_pool_in_any_order(merger, tiny_checkpoints, tmp_path):
    base, first, second = (tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b"))
    recipe = PSRecipe.uniform("dare_ties", base, [second, first], weight=[0.3, 0.7], density=[0.4, 0.8])
    state = merger.merge(recipe).state_dict()
    disk = CheckpointReader(merge_to_disk(recipe, tmp_path / "merged"))
    for name in disk.names:
        assert torch.equal(state[name], disk.read(name))


def test_recipe_outside_the_pool_is_refused(merger, tiny_checkpoints, tmp_path):
    base, first = tiny_checkpoints["base"], tiny_checkpoints["expert_a"]
    with pytest.raises(MergeError, match="not in this merger's pool"):
        merger.merge(PSRecipe.uniform("ties", base, [first, tmp_path / "other"], density=0.5))
    with pytest.raises(MergeError, match="has base"):
        merger.merge(PSRecipe.uniform("ties", first, [first], density=0.5))


def test_dare_seed_changes_the_candidate(merger, tiny_checkpoints):
    base, first = tiny_checkpoints["base"], tiny_checkpoints["expert_a"]
    name = "model.layers.0.mlp.up_proj.weight"
    results = []
    for seed in (0, 1, 0):
        recipe = PSRecipe.uniform("dare_ties", base, [first], density=0.5, parameters={"seed": seed})
        results.append(merger.merge(recipe).state_dict()[name].clone())
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_sources_come_from_the_resident_pool_as_load_model_gives_them(tiny_checkpoints, tmp_path, dtype):
    """The held-out report's source rows: every tensor (and buffer) of `merger.source(path)` equals the model
    `load_model(path, dtype)` loads, after a candidate has overwritten the resident model."""
    paths = [tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b")]
    merger = InMemoryMerger(paths[0], paths[1:], dtype=dtype)
    for path in paths:
        merger.merge(recipe_for("ties", tiny_checkpoints, tmp_path))
        resident = merger.source(path).state_dict()
        loaded = load_model(path, dtype=dtype or "float32").state_dict()
        assert set(resident) == set(loaded)
        for name, tensor in loaded.items():
            assert resident[name].dtype == tensor.dtype and torch.equal(resident[name], tensor), (path, name)
    with pytest.raises(MergeError, match="not in this merger's pool"):
        merger.source(tmp_path)


def test_a_bfloat16_merger_holds_and_merges_the_pool_in_bfloat16(tiny_checkpoints, tmp_path):
    """dtype=bfloat16 over float32 checkpoints: the pool and the candidate are bf16 (half the memory), and a
    candidate equals the disk merge of bf16 copies of the checkpoints."""
    merger = InMemoryMerger(tiny_checkpoints["base"], [tiny_checkpoints["expert_a"], tiny_checkpoints["expert_b"]],
                            dtype="bfloat16")
    assert {tensor.dtype for pool in merger._pool for tensor in pool.values()} == {torch.bfloat16}
    copies = {}
    for key in ("base", "expert_a", "expert_b"):
        load_model(tiny_checkpoints[key], dtype="bfloat16").save_pretrained(tmp_path / key)
        load_tokenizer(tiny_checkpoints[key]).save_pretrained(tmp_path / key)
        copies[key] = tmp_path / key
    recipe = recipe_for("ties", tiny_checkpoints, tmp_path)
    state = merger.merge(recipe).state_dict()
    bf16_recipe = recipe_for("ties", copies, tmp_path)
    disk = CheckpointReader(merge_to_disk(bf16_recipe, tmp_path / "merged"))
    for name in disk.names:
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], disk.read(name)), name
