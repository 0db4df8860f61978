"""PSRecipe: canonical YAML, stable hash, programmatic construction and validation messages."""

from __future__ import annotations

import dataclasses
import math

import pytest

from evomerge.errors import MergeError
from evomerge.recipe import GroupValues, PSRecipe, RecipeError


def ties_recipe(**overrides):
    values = {"weight": [0.6, 0.4], "density": 0.5}
    values.update(overrides)
    return PSRecipe.uniform("ties", "/m/base", ["/m/a", "/m/b"], **values)


def test_yaml_round_trip_and_hash():
    recipe = ties_recipe()
    again = PSRecipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.hash == recipe.hash
    assert len(recipe.hash) == 12 and int(recipe.hash, 16) >= 0
    data = recipe.to_dict()
    assert data["kind"] == "ps" and data["method"] == "ties" and data["base"] == "/m/base"
    assert data["parameters"] == {"lambda": 1.0, "normalize": True}  # method defaults filled in
    assert data["groups"][0] == {"name": "embed", "weight": [0.6, 0.4], "density": [0.5, 0.5]}


def test_save_and_load(tmp_path):
    recipe = ties_recipe()
    assert PSRecipe.load(recipe.save(tmp_path / "recipe.yaml")) == recipe


def test_hash_is_the_same_for_recipes_meaning_the_same_merge():
    assert ties_recipe(density=0.5).hash == ties_recipe(density=[0.5, 0.5]).hash
    explicit = PSRecipe.uniform("ties", "/m/base", ["/m/a", "/m/b"], weight=[0.6, 0.4], density=0.5,
                                parameters={"lambda": 1, "normalize": True})
    assert explicit.hash == ties_recipe().hash
    assert ties_recipe(density=0.51).hash != ties_recipe().hash
    assert hash(ties_recipe()) == hash(ties_recipe(density=[0.5, 0.5]))


def test_hand_written_yaml_with_per_group_values():
    recipe = PSRecipe.from_yaml(
        """
kind: ps
method: dare_ties
base: /m/base
models: [/m/a, /m/b]
parameters: {seed: 3, rescale: l1}
groups:
  - {name: embed, weight: [0.5, 0.7], density: [0.3, 0.5]}
  - {name: blocks.0-1, weight: 1, density: 0.9}
  - {name: head}
"""
    )
    assert recipe.group_names == ("embed", "blocks.0-1", "head")
    assert recipe.groups[1]["weight"] == (1.0, 1.0)
    assert recipe.groups[2]["density"] == (1.0, 1.0)  # defaults
    assert recipe.parameters["seed"] == 3 and recipe.parameters["normalize"] is False


def test_recipes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ties_recipe().method = "linear"


def test_slerp_takes_one_t_per_group():
    recipe = PSRecipe.uniform("slerp", None, ["/m/a", "/m/b"], t=0.25, groups=["embed", "blocks", "head"])
    assert recipe.groups[0]["t"] == 0.25 and recipe.base is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PSRecipe.uniform("soup", None, ["a"]), "unknown merge method 'soup'"),
        (lambda: ties_recipe(density=0.0), r"density for model '/m/a' must be in \(0, 1\]"),
        (lambda: ties_recipe(density=[0.5, 1.5]), r"density for model '/m/b' must be in \(0, 1\], got 1.5"),
        (lambda: ties_recipe(weight=[math.nan, 1.0]), "weight for model '/m/a' must be finite"),
        (lambda: ties_recipe(weight=[1.0, math.inf]), "weight for model '/m/b' must be finite"),
        (lambda: ties_recipe(weight=[1.0, 2.0, 3.0]), "weight has 3 values but the recipe has 2 models"),
        (lambda: ties_recipe(t=0.5), "ties has no per-group value"),
        (lambda: PSRecipe.uniform("ties", None, ["a", "b"]), "ties needs a base model"),
        (lambda: PSRecipe.uniform("linear", "base", ["a", "b"]), "linear takes no base model"),
        (lambda: PSRecipe.uniform("slerp", None, ["a", "b", "c"]), "slerp merges exactly 2 models"),
        (lambda: PSRecipe.uniform("ties", "b", ["a"], parameters={"alpha": 1}), r"ties has no parameter\(s\) \['alpha'\]"),
        (lambda: PSRecipe.uniform("dare_ties", "b", ["a"], parameters={"rescale": "l2"}), "rescale"),
        (lambda: PSRecipe.uniform("ties", "b", ["a"], groups=["embed", "blocks", "blocks.1"]), "overlap"),
        (lambda: PSRecipe.uniform("ties", "b", ["a"], groups=[]), "no layer groups"),
        (lambda: PSRecipe.uniform("ties", "b", []), "lists no models"),
        (lambda: PSRecipe.from_dict({"method": "ties", "models": ["a"], "kind": "dfs"}), "not a parameter-space"),
    ],
)
def test_validation_messages(build, message):
    with pytest.raises(RecipeError, match=message):
        build()


def test_recipe_errors_are_merge_errors_and_value_errors():
    assert issubclass(RecipeError, MergeError) and issubclass(RecipeError, ValueError)


def test_group_values_can_be_built_directly():
    recipe = PSRecipe(
        method="task_arithmetic",
        base="b",
        models=("a",),
        groups=(GroupValues("embed", {"weight": 0.0}), GroupValues("blocks", {"weight": 1.0}), GroupValues("head", {})),
    )
    assert recipe.groups[0]["weight"] == (0.0,) and recipe.groups[2]["weight"] == (1.0,)


def test_bad_group_names_are_recipe_errors():
    with pytest.raises(RecipeError, match="unknown layer group 'mlp'"):
        PSRecipe.uniform("ties", "b", ["a"], groups=["mlp"])
