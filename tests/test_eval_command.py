"""`evomerge eval` end to end on a tiny checkpoint: the JSON report, its samples, task options and the cache."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from evomerge.eval.command import eval_command, model_key
from evomerge.merge.stream import merge_to_disk
from evomerge.recipe import PSRecipe
from evomerge.resources import DATA_DIR


def test_eval_command_writes_a_report_with_every_sample(tiny_checkpoints, tmp_path):
    out = tmp_path / "report.json"
    cfg = OmegaConf.create(
        {
            "model": str(tiny_checkpoints["expert_b"]),
            "task": {"name": "mgsm_ja", "batch_size": 64, "max_new_tokens": None},
            "split": "test",
            "out": str(out),
            "max_new_tokens": 3,
            "progress": False,
        }
    )
    returned = eval_command(cfg)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report == returned
    assert report["task"] == "mgsm_ja" and report["split"] == "test" and report["metrics"]["split"] == "test"
    assert report["metrics"]["n"] == 250 and len(report["samples"]) == 250
    assert report["generation"]["mgsm_ja"] == {"decoding": "greedy", "max_new_tokens": 3, "stop_strings": ["### 指示"]}
    sample = report["samples"][0]
    assert {"prompt", "generation", "extracted", "gold", "japanese_prob", "correct", "correct_ja"} <= set(sample)
    assert sample["gold"] == "18" and sample["prompt"].endswith("### 応答:\n")
    assert report["data_sources"]["mgsm_ja"] == str(DATA_DIR.resolve() / "mgsm" / "mgsm_ja.tsv")  # no mgsm_dir: shipped data


def test_eval_command_reuses_its_cache_file(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo"
    path = zoo / "data" / "toy_ja_qa" / "search.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"question": "花子は何を持っていますか？", "answer": "青いぼうし"}) + "\n")
    cfg = OmegaConf.create(
        {
            "model": str(tiny_checkpoints["base"]),
            "task": "toy_ja_qa",
            "split": "search",
            "out": str(tmp_path / "r.json"),
            "zoo_dir": str(zoo),
            "cache": str(tmp_path / "cache.json"),
            "progress": False,
        }
    )
    first = eval_command(cfg)
    assert first["cached"] is False and first["metrics"]["n"] == 1
    assert first["model_key"].startswith(model_key(tiny_checkpoints["base"]))
    monkeypatch.setattr("evomerge.eval.evaluator.generate_encoded", None)  # generating again would fail
    assert eval_command(cfg)["cached"] is True
    assert "toy_ja_qa [search]" in capsys.readouterr().out


def test_eval_command_errors_are_explicit(tiny_checkpoints):
    with pytest.raises(ValueError, match="needs one of model="):
        eval_command(OmegaConf.create({"task": "toy_ja_qa"}))
    with pytest.raises(ValueError, match="needs one of model="):
        eval_command(OmegaConf.create({"model": "m", "recipe": "r.yaml", "task": "toy_ja_qa"}))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        eval_command(OmegaConf.create({"model": str(tiny_checkpoints["base"]), "task": "nope"}))


def test_eval_of_a_recipe_matches_eval_of_the_model_merged_to_disk(tiny_checkpoints, tmp_path):
    recipe = PSRecipe.uniform("ties", tiny_checkpoints["base"], [tiny_checkpoints["expert_a"], tiny_checkpoints["expert_b"]],
                              groups=["embed", "blocks.0", "blocks.1", "head"], weight=[0.7, 0.4], density=0.5)
    merged = merge_to_disk(recipe, tmp_path / "merged")
    common = {"task": "mgsm_ja", "split": "test", "max_new_tokens": 4, "progress": False}
    from_recipe = eval_command(OmegaConf.create({**common, "recipe": str(recipe.save(tmp_path / "r.yaml")),
                                                 "out": str(tmp_path / "a.json")}))
    from_disk = eval_command(OmegaConf.create({**common, "model": str(merged), "out": str(tmp_path / "b.json")}))
    assert from_recipe["recipe_hash"] == recipe.hash and from_recipe["model_key"] == f"recipe:{recipe.hash}|float32"
    assert [x["generation"] for x in from_recipe["samples"]] == [x["generation"] for x in from_disk["samples"]]
