"""Bad input: each a clear MergeError naming the model and tensor, and nothing left at the output path."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

from evomerge.merge import MergeError, merge_to_disk
from evomerge.recipe import PSRecipe, RecipeError

UP_PROJ = "model.layers.1.mlp.up_proj.weight"


def derived_checkpoint(source: Path, destination: Path, edit: Callable[[dict], None] | None = None,
                       edit_config: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``source`` with its tensors and/or config edited in place by the callbacks."""
    shutil.copytree(source, destination)
    if edit is not None:
        tensors = load_file(destination / "model.safetensors")
        edit(tensors)
        save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((destination / "config.json").read_text())
        edit_config(config)
        (destination / "config.json").write_text(json.dumps(config))
    return destination


def assert_fails_cleanly(recipe: PSRecipe, out: Path, *fragments: str) -> None:
    with pytest.raises(MergeError) as caught:
        merge_to_disk(recipe, out)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"
    assert not out.exists()
    assert not [path for path in out.parent.iterdir() if path.name.startswith(f".{out.name}")]


@pytest.mark.parametrize(("value", "label"), [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_weights(tiny_checkpoints, tmp_path, value, label):
    def poison(tensors):
        tensors["lm_head.weight"][3, 4] = value  # the last tensor: fails after others were written

    broken = derived_checkpoint(tiny_checkpoints["expert_b"], tmp_path / f"broken_{label}", poison)
    recipe = PSRecipe.uniform("ties", tiny_checkpoints["base"], [tiny_checkpoints["expert_a"], broken], density=0.5)
    assert_fails_cleanly(recipe, tmp_path / "out" / "merged", str(broken), "'lm_head.weight'", "NaN or infinite")


def test_missing_tensor(tiny_checkpoints, tmp_path):
    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "missing", lambda t: t.pop(UP_PROJ))
    recipe = PSRecipe.uniform("task_arithmetic", tiny_checkpoints["base"], [broken])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), "missing tensor", UP_PROJ)


def test_extra_tensor(tiny_checkpoints, tmp_path):
    def add(tensors):
        tensors["model.layers.1.extra.weight"] = torch.zeros(2)

    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "extra", add)
    recipe = PSRecipe.uniform("linear", None, [tiny_checkpoints["expert_b"], broken])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), "model.layers.1.extra.weight")


def test_shape_mismatch(tiny_checkpoints, tmp_path):
    def shrink(tensors):
        tensors[UP_PROJ] = tensors[UP_PROJ][:48].clone()

    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "narrow", shrink)
    recipe = PSRecipe.uniform("ties", tiny_checkpoints["base"], [broken], density=0.5)
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), UP_PROJ, "shape [48, 32]", "[64, 32]")


def test_vocab_size_mismatch(tiny_checkpoints, tmp_path):
    def grow_vocab(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat([tensors[name], tensors[name][:3]])

    def grow_config(config):
        config["vocab_size"] += 3

    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "bigger_vocab", grow_vocab, grow_config)
    recipe = PSRecipe.uniform("task_arithmetic", tiny_checkpoints["base"], [broken])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), "vocab size")


def test_different_architectures(tiny_checkpoints, tmp_path):
    mistral = MistralForCausalLM.from_pretrained(tiny_checkpoints["base"])
    llama = LlamaForCausalLM(LlamaConfig(**{key: getattr(mistral.config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")}))
    llama.save_pretrained(tmp_path / "llama")  # same tensor names and shapes, different architecture
    recipe = PSRecipe.uniform("linear", None, [tiny_checkpoints["base"], tmp_path / "llama"])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(tmp_path / "llama"), "architecture", "llama")


def test_recipe_groups_must_cover_the_model(tiny_checkpoints, tmp_path):
    recipe = PSRecipe.uniform("task_arithmetic", tiny_checkpoints["base"], [tiny_checkpoints["expert_a"]],
                              groups=["embed", "blocks.0", "head"])
    assert_fails_cleanly(recipe, tmp_path / "merged", "model.layers.1.", "none of the recipe's groups")


def test_missing_checkpoint(tiny_checkpoints, tmp_path):
    recipe = PSRecipe.uniform("task_arithmetic", tiny_checkpoints["base"], [tmp_path / "nowhere"])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("density", ["0.0", "1.01", "-0.5", ".nan"])
def test_density_outside_unit_interval(density):
    text = f"method: ties\nbase: b\nmodels: [a]\ngroups: [{{name: blocks, density: {density}}}]\n"
    with pytest.raises(RecipeError, match="density for model 'a' must be"):
        PSRecipe.from_yaml(text)
