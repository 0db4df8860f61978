"""Bad input: each a clear MergeError naming the model and tensor, and nothing left at the output path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge.stream import merge_to_disk
from evomerge.recipe import PSRecipe, RecipeError
from tests.helpers.checkpoints import UP_PROJ, bigger_vocab, bigger_vocab_config, derived_checkpoint, llama_twin, narrower

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
    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "narrow", narrower)
    recipe = PSRecipe.uniform("ties", tiny_checkpoints["base"], [broken], density=0.5)
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), UP_PROJ, "shape [48, 32]", "[64, 32]")


def test_vocab_size_mismatch(tiny_checkpoints, tmp_path):
    broken = derived_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "bigger_vocab", bigger_vocab,
                                bigger_vocab_config)
    recipe = PSRecipe.uniform("task_arithmetic", tiny_checkpoints["base"], [broken])
    assert_fails_cleanly(recipe, tmp_path / "merged", str(broken), "vocab size")


def test_different_architectures(tiny_checkpoints, tmp_path):
    llama_twin(tiny_checkpoints["base"], tmp_path / "llama")  # same tensor names and shapes, different architecture
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
