"""`evomerge export`: mergekit rebuilds the same tensors from the exported config, its filters select exactly
each layer group, a run directory exports a loadable model with a scored card, and bad input fails cleanly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, MistralForCausalLM

from conftest import tiny_config
from evomerge.export import (
    CheckpointLayout,
    ExportError,
    ExportWarning,
    export,
    export_command,
    group_filters,
    mergekit_config,
    mergekit_yaml,
)
from evomerge.errors import MergeError
from evomerge.merge.stream import merge_to_disk
from evomerge.merge.groups import assign_groups
from evomerge.modelio import CheckpointReader
from evomerge.recipe import GroupValues, PSRecipe

BF16_RESOLUTION = 2.0**-8
TINY_GROUPS = ("embed", "blocks.0", "blocks.1", "head")


def per_group_recipe(method: str, checkpoints: dict[str, Path], **parameters) -> PSRecipe:
    """A recipe whose values differ in every group and between the two models."""
    base, first, second = (str(checkpoints[key]) for key in ("base", "expert_a", "expert_b"))
    groups = []
    for index, name in enumerate(TINY_GROUPS):
        values = {"t": 0.2 + 0.2 * index} if method == "slerp" else {"weight": [0.3 + 0.2 * index, 0.9 - 0.15 * index]}
        if method == "ties":
            values["density"] = [0.2 + 0.2 * index, 0.9 - 0.2 * index]
        groups.append(GroupValues(name, values))
    return PSRecipe(method=method, base=None if method in ("linear", "slerp") else base, models=(first, second),
                    groups=tuple(groups), parameters=parameters)


@pytest.mark.parametrize("method, parameters", [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.9, "normalize": True}), ("ties", {"lambda": 1.1}), ("slerp", {}),
])
def test_mergekit_rebuilds_the_same_tensors(tiny_checkpoints, tmp_path, method, parameters):
    mergekit_api = pytest.importorskip("mergekit.config", reason="mergekit (a dev extra) is not installed")
    mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (a dev extra) is not installed")
    recipe = per_group_recipe(method, tiny_checkpoints, **parameters)
    text, notes = mergekit_yaml(recipe)
    config = yaml.safe_load(text)  # the written YAML, as mergekit-yaml reads it
    setting = config["parameters"]["t"] if method == "slerp" else config["models"][0]["parameters"]["weight"]
    assert notes == [] and isinstance(setting, list)  # per-group values
    options = mergekit_merge.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_merge.run_merge(mergekit_api.MergeConfiguration.model_validate(config), str(tmp_path / "mk"), options)
    ours, theirs = CheckpointReader(merge_to_disk(recipe, tmp_path / "ours")), CheckpointReader(tmp_path / "mk")
    assert set(ours.names) == set(theirs.names)
    for name in ours.names:
        torch.testing.assert_close(ours.read(name), theirs.read(name), rtol=BF16_RESOLUTION,
                                   atol=BF16_RESOLUTION * 1e-2, msg=lambda message: f"{method} {name}: {message}")


def test_filters_select_exactly_each_group():
    """12 blocks, so `layers.1.` must not catch `layers.10.`/`layers.11.`; resolved the way mergekit does."""
    names = tuple(MistralForCausalLM(tiny_config(64, layers=12)).state_dict())
    groups = ("embed", "blocks.0", "blocks.1", "blocks.2-10", "blocks.11", "head")
    filters, fallback = group_filters(groups, names)
    assert filters[2] == ["model.layers.1."] and groups[fallback] == "head"

    recipe = PSRecipe(method="task_arithmetic", base="base", models=("a", "b"),
                      groups=tuple(GroupValues(name, {"weight": [float(index), 0.5]}) for index, name in enumerate(groups)))
    setting = mergekit_config(recipe, CheckpointLayout(names, ("float32",)))["models"][0]["parameters"]["weight"]
    mergekit_api = pytest.importorskip("mergekit.config", reason="mergekit (a dev extra) is not installed")
    conditions = [mergekit_api.ConditionalParameter.model_validate(entry) for entry in setting]
    expected = assign_groups(names, groups)
    for name in names:
        assert mergekit_api.evaluate_setting(name, conditions, validate=float) == expected[name], name


def fake_run(tmp_path: Path, recipe: PSRecipe, *, recipe_hash: str | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    recipe.save(run / "best_recipe.yaml")
    rows = [
        {"name": "base", "kind": "source", "metrics": {"fitness": 0.125, "acc": 0.125}},
        {"name": "best (search)", "kind": "best", "metrics": {"fitness": 0.4375, "acc": 0.4375, "ja_rate": 0.8125},
         "recipe_hash": recipe_hash or recipe.hash},
    ]
    paired = [{"model": "best (search)", "against": "base", "kind": "source", "difference": 0.3125,
               "ci95": [0.0625, 0.5625], "mcnemar_p": 0.0391, "better": 6, "worse": 1, "n": 16}]
    report = {"split": "test", "objective": "acc", "task": "toy_two_skill", "rows": rows, "search": {},
              "paired": paired}
    (run / "report.json").write_text(json.dumps(report))
    return run


def uniform_ties(checkpoints: dict[str, Path]) -> PSRecipe:
    return PSRecipe.uniform("ties", str(checkpoints["base"]),
                            [str(checkpoints["expert_a"]), str(checkpoints["expert_b"])], weight=[0.6, 0.4], density=0.5)


def test_export_from_run_directory(tiny_checkpoints, tmp_path):
    recipe = uniform_ties(tiny_checkpoints)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # ties is exact: nothing to warn about
        out = export_command(OmegaConf.create({"run": str(fake_run(tmp_path, recipe)), "out": str(tmp_path / "ex")}))
    assert sorted(path.name for path in out.iterdir()) == ["mergekit.yaml", "model", "recipe.yaml"]
    assert PSRecipe.load(out / "recipe.yaml").hash == recipe.hash
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["merge_method"] == "ties"
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 2
    card = (out / "model" / "README.md").read_text()
    assert recipe.hash in card and "| acc | 0.4375 |" in card and "| ja_rate | 0.8125 |" in card
    assert "toy_two_skill" in card
    assert "paired on the same 16 rows" in card and "| base | +0.3125 | [+0.0625, +0.5625] | 0.0391 | 6 / 1 |" in card
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left


def test_export_recipe_file_and_overwrite(tiny_checkpoints, tmp_path):
    recipe_file = uniform_ties(tiny_checkpoints).save(tmp_path / "r.yaml")
    (tmp_path / "ex").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(recipe_file, tmp_path / "ex")
    out = export(recipe_file, tmp_path / "ex", overwrite=True)
    assert "## Scores" not in (out / "model" / "README.md").read_text()


def test_report_for_another_recipe_gives_no_scores(tiny_checkpoints, tmp_path):
    run = fake_run(tmp_path, uniform_ties(tiny_checkpoints), recipe_hash="0123456789ab")
    with pytest.warns(ExportWarning, match="scores recipe 0123456789ab"):
        out = export(run, tmp_path / "ex")
    assert "## Scores" not in (out / "model" / "README.md").read_text()


@pytest.mark.parametrize("method, values, expected", [
    ("dare_linear", {"weight": [0.5, 0.5], "density": 0.5}, ["DARE drop masks differ", "1/density"]),
    ("fisher", {"weight": [0.5, 0.5]}, ["no fisher merge"]),
    ("regmean", {"weight": [0.5, 0.5]}, ["no regmean merge"]),
])
def test_inexact_configs_say_what_differs(tiny_checkpoints, method, values, expected):
    base = str(tiny_checkpoints["base"]) if method.startswith("dare") else None
    recipe = PSRecipe.uniform(method, base, [str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"])],
                              **values)
    text, notes = mergekit_yaml(recipe)
    assert len(notes) == len(expected) and all(part in note for part, note in zip(expected, notes))
    assert [line[len("# note: "):] for line in text.splitlines() if line.startswith("# note:")] == notes
    assert "same tensors" not in text


def test_export_warns_when_mergekit_differs(tiny_checkpoints, tmp_path):
    recipe = PSRecipe.uniform("dare_ties", str(tiny_checkpoints["base"]),
                              [str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"])],
                              parameters={"rescale": "l1"}, weight=[0.5, 0.5], density=0.5)
    with pytest.warns(ExportWarning) as caught:
        out = export(recipe.save(tmp_path / "r.yaml"), tmp_path / "ex")
    assert [str(warning.message) for warning in caught] == [
        f"mergekit.yaml is not exact: {note}" for note in mergekit_yaml(recipe)[1]]
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["parameters"]["rescale"] is True


@pytest.mark.parametrize("settings, message", [
    ({"out": "x"}, "exactly one of run="),
    ({"run": "r", "recipe": "r.yaml", "out": "x"}, "exactly one of run="),
    ({"run": "{tmp}/missing", "out": "x"}, "no such directory"),
    ({"recipe": "{tmp}/missing.yaml", "out": "x"}, "no such file"),
    ({"run": "{tmp}"}, "needs out="),
    ({"run": "{tmp}", "out": "{tmp}/ex"}, "no best_recipe.yaml"),
])
def test_command_errors(tmp_path, settings, message):
    cfg = OmegaConf.create({key: value.format(tmp=tmp_path) for key, value in settings.items()})
    with pytest.raises(ExportError, match=message):
        export_command(cfg)


def test_failed_merge_leaves_nothing(tiny_checkpoints, tmp_path):
    recipe = uniform_ties(tiny_checkpoints)
    broken = PSRecipe.uniform("ties", recipe.base, [recipe.models[0], str(tmp_path / "gone")], weight=0.5)
    with pytest.raises(MergeError, match="gone"):
        export(fake_run(tmp_path, broken), tmp_path / "out" / "ex")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
