"""`evomerge merge` entry point and the evomerge/conf/merge method defaults."""

from __future__ import annotations


import pytest
import yaml
from omegaconf import OmegaConf

from evomerge.errors import MergeError
from evomerge.merge.command import merge_command
from evomerge.modelio import CheckpointReader
from evomerge.recipe import METHODS, PSRecipe
from evomerge.resources import CONF_DIR

CONF = CONF_DIR / "merge"


def test_every_method_has_a_config_that_builds_a_recipe():
    configs = {yaml.safe_load(path.read_text())["method"]: yaml.safe_load(path.read_text())
               for path in CONF.glob("*.yaml")}
    assert set(configs) == set(METHODS)
    for method, config in configs.items():
        recipe = PSRecipe.from_merge_config(config, "base", ["a", "b"])
        assert recipe.method == method
    assert configs["ties"] == {"method": "ties", "weight": 1.0, "density": 0.5, "lambda": 1.0, "normalize": True}


def test_merge_command_with_a_recipe_file(tiny_checkpoints, tmp_path, capsys):
    recipe = PSRecipe.uniform("ties", tiny_checkpoints["base"], [tiny_checkpoints["expert_a"]], density=0.4)
    recipe_file = recipe.save(tmp_path / "recipe.yaml")
    merge_command(OmegaConf.create({"recipe": str(recipe_file), "out": str(tmp_path / "merged")}))
    assert CheckpointReader(tmp_path / "merged").names
    assert recipe.hash in capsys.readouterr().out


def test_merge_command_from_the_merge_config_group(tiny_checkpoints, tmp_path):
    cfg = OmegaConf.create({
        "merge": yaml.safe_load((CONF / "task_arithmetic.yaml").read_text()),
        "base": str(tiny_checkpoints["base"]),
        "models": [str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"])],
        "out": str(tmp_path / "merged"),
    })
    merge_command(cfg)
    assert PSRecipe.load(tmp_path / "merged" / "evomerge_recipe.yaml").method == "task_arithmetic"
    with pytest.raises(MergeError, match="needs out"):
        merge_command(OmegaConf.create({"recipe": "r.yaml"}))
