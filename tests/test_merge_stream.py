"""Disk -> disk merging: loadable output, values against formulas computed here, shards, model card."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

from evomerge.errors import MergeError
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader
from evomerge.recipe import PSRecipe


def weights_of(path):
    reader = CheckpointReader(path)
    return {name: reader.read(name) for name in reader.names}


def reference_ties(base, tensors, weights, density):
    """TIES written out directly: top-k by sorting, per-element sign vote, mean over agreeing weights."""
    deltas = []
    for tensor, weight in zip(tensors, weights):
        delta = (tensor - base).flatten()
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[delta.abs().argsort(descending=True)[: max(1, int(density * delta.numel()))]] = True
        deltas.append(torch.where(keep, delta, 0.0) * weight)
    stacked = torch.stack(deltas)
    vote = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == vote
    weight_column = torch.tensor(weights).unsqueeze(1)
    total_weight = (agree * weight_column).sum(0)
    merged = (stacked * agree).sum(0) / torch.where(total_weight == 0, 1.0, total_weight)
    return base + merged.reshape(base.shape)


def test_task_arithmetic_output_loads_and_matches_the_formula(tiny_checkpoints, tmp_path):
    base, first, second = (tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b"))
    recipe = PSRecipe.uniform("task_arithmetic", base, [first, second], weight=[0.7, 0.3], parameters={"lambda": 0.8})
    out = merge_to_disk(recipe, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, MistralForCausalLM)
    state = model.state_dict()
    theta0, theta1, theta2 = weights_of(base), weights_of(first), weights_of(second)
    for name, base_tensor in theta0.items():
        expected = base_tensor + 0.8 * (0.7 * (theta1[name] - base_tensor) + 0.3 * (theta2[name] - base_tensor))
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)


def test_ties_matches_a_direct_implementation(tiny_checkpoints, tmp_path):
    base, first, second = (tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b"))
    recipe = PSRecipe.uniform("ties", base, [first, second], weight=[0.6, 0.4], density=0.3)
    merged = weights_of(merge_to_disk(recipe, tmp_path / "merged"))
    theta0, theta1, theta2 = weights_of(base), weights_of(first), weights_of(second)
    for name, base_tensor in theta0.items():
        expected = reference_ties(base_tensor, [theta1[name], theta2[name]], [0.6, 0.4], 0.3)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_each_layer_group_gets_its_own_values(tiny_checkpoints, tmp_path):
    base, first = tiny_checkpoints["base"], tiny_checkpoints["expert_a"]
    recipe = PSRecipe(
        method="task_arithmetic",
        base=str(base),
        models=(str(first),),
        groups=({"name": "embed", "weight": 0.0}, {"name": "blocks.0", "weight": 1.0},
                {"name": "blocks.1", "weight": 0.5}, {"name": "head", "weight": 1.0}),
    )
    merged = weights_of(merge_to_disk(recipe, tmp_path / "merged"))
    theta0, theta1 = weights_of(base), weights_of(first)
    assert torch.equal(merged["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], theta1["model.layers.0.mlp.up_proj.weight"])
    half = theta0["model.layers.1.mlp.up_proj.weight"] + 0.5 * (
        theta1["model.layers.1.mlp.up_proj.weight"] - theta0["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"], half, rtol=0, atol=1e-7)
    assert torch.equal(merged["lm_head.weight"], theta1["lm_head.weight"])


def test_sharded_inputs_and_outputs(tiny_checkpoints, tmp_path):
    base, first, second = (tiny_checkpoints[key] for key in ("base", "expert_a", "expert_b"))
    sharded_base = tmp_path / "sharded_base"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded_base, max_shard_size="20KB")
    assert (sharded_base / "model.safetensors.index.json").exists()
    AutoTokenizer.from_pretrained(base).save_pretrained(sharded_base)
    recipe = PSRecipe.uniform("ties", sharded_base, [first, second], weight=[0.5, 0.5], density=0.5)
    plain = PSRecipe.uniform("ties", base, [first, second], weight=[0.5, 0.5], density=0.5)
    out = merge_to_disk(recipe, tmp_path / "from_shards", max_shard_bytes=16_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 2
    expected = weights_of(merge_to_disk(plain, tmp_path / "plain"))
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor)


def test_output_directory_is_complete(tiny_checkpoints, tmp_path):
    base, first = tiny_checkpoints["base"], tiny_checkpoints["expert_a"]
    recipe = PSRecipe.uniform("dare_ties", base, [first], weight=1.0, density=0.7, parameters={"seed": 5})
    out = merge_to_disk(recipe, tmp_path / "merged")
    card = (out / "README.md").read_text()
    assert recipe.hash in card and recipe.to_yaml() in card
    assert PSRecipe.load(out / "evomerge_recipe.yaml") == recipe
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(base))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging directory left behind
    # the same recipe always gives the same model (DARE draws are seeded per tensor)
    again = merge_to_disk(recipe, tmp_path / "again")
    assert load_file(again / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()
    for name, tensor in load_file(again / "model.safetensors").items():
        assert torch.equal(tensor, load_file(out / "model.safetensors")[name])


def test_existing_output_needs_overwrite(tiny_checkpoints, tmp_path):
    base, first = tiny_checkpoints["base"], tiny_checkpoints["expert_a"]
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    recipe = PSRecipe.uniform("task_arithmetic", base, [first], weight=1.0)
    with pytest.raises(MergeError, match="already exists"):
        merge_to_disk(recipe, out)
    merge_to_disk(recipe, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]
    shutil.rmtree(out)
