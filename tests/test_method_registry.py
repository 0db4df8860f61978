"""The merge-method registry: a method's signature is its spec, and everything that reads the registry agrees.

Each registered method has one config with every key a user may override, a search range for each value in the
search config, a paper, and a genome whose every point decodes to a valid recipe.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from torch import Tensor

from evomerge.errors import MergeError, RecipeError
from evomerge.merge.methods import METHODS
from evomerge.merge.methods.registry import WEIGHT, Finite, Inputs, Mergekit, PerGroup, PerModel, Value, merge_method
from evomerge.recipe import PSRecipe
from evomerge.resources import CONF_DIR
from evomerge.search.genome import PSGenomeSpace


@pytest.fixture
def toy_method():
    """A method registered for one test, removed after it."""

    @merge_method("toy_scale", paper="none", mergekit=Mergekit(None), base="none")
    def toy(inputs: Inputs, *, weight: PerModel = WEIGHT, t: PerGroup = Value(0.5, (0.0, 1.0), low=0.0, high=1.0),
            lambda_: Finite = 1.0, flag: bool = False) -> Tensor:
        return inputs.tensors[0] * lambda_

    yield toy
    del METHODS["toy_scale"]


def test_the_signature_declares_the_spec(toy_method):
    assert dict(toy_method.per_model) == {"weight": WEIGHT}
    assert list(toy_method.per_group) == ["t"]
    assert dict(toy_method.options) == {"lambda": 1.0, "flag": False}  # trailing underscore dropped
    recipe = PSRecipe.uniform("toy_scale", None, ["a", "b"], parameters={"lambda": 2})
    assert recipe.parameters == {"flag": False, "lambda": 2.0} and isinstance(recipe.parameters["lambda"], float)


@pytest.mark.parametrize("parameters, message", [
    ({"flag": "yes"}, "toy_scale parameter 'flag': input should be a valid boolean, got 'yes'"),
    ({"lambda": float("nan")}, "toy_scale parameter 'lambda': input should be a finite number"),
    ({"lambda": "x"}, "toy_scale parameter 'lambda': input should be a valid number"),
    ({"gamma": 1}, r"toy_scale has no parameter(s) ['gamma']"),
])
def test_bad_options_are_one_line(toy_method, parameters, message):
    with pytest.raises(RecipeError) as error:
        PSRecipe.uniform("toy_scale", None, ["a"], parameters=parameters)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_name_registers_once(toy_method):
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("toy_scale", paper="none", mergekit=Mergekit(None))(toy_method.function)


def test_values_need_a_value_default():
    with pytest.raises(TypeError, match="needs a Value"):
        @merge_method("toy_bad", paper="none", mergekit=Mergekit(None))
        def bad(inputs: Inputs, *, weight: PerModel = 1.0) -> Tensor:
            return inputs.tensors[0]
    assert "toy_bad" not in METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_has_one_config_with_every_key(name):
    spec = METHODS[name]
    config = yaml.safe_load((CONF_DIR / "merge" / f"{name}.yaml").read_text())
    assert set(config) == {"method", *spec.values, *spec.options}, "Hydra needs every overridable key in the YAML"
    assert config["method"] == name and spec.paper
    PSRecipe.from_merge_config(config, "base", ["a", "b"])  # the config's values are valid


def test_the_search_config_names_every_value():
    ranges = yaml.safe_load((CONF_DIR / "search" / "ps_cmaes.yaml").read_text())["ranges"]
    assert {key for spec in METHODS.values() for key in spec.values} <= set(ranges)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_point_of_the_genome_is_a_valid_recipe(name):
    spec = METHODS[name]
    least, most = spec.n_models
    models = tuple(f"/m/{index}" for index in range(max(least, min(2, most or 2))))
    make = lambda: PSGenomeSpace(name, "/m/base" if spec.takes_base else None, models,  # noqa: E731
                                 ("embed", "blocks.0", "head"))
    if not spec.values:
        with pytest.raises(MergeError, match=f"{name} has no values to search"):
            make()
        return
    space = make()
    rng = np.random.default_rng(0)
    for genome in [np.zeros(space.dim), np.ones(space.dim), *rng.random((30, space.dim))]:
        recipe = space.decode(genome)
        assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_a_path_option_is_kept_as_its_string():
    from pathlib import Path

    recipe = PSRecipe.uniform("fisher", None, ["a"], parameters={"prompts": Path("prompts.txt")})
    assert recipe.parameters["prompts"] == "prompts.txt"
    assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe
