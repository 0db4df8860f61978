"""The toy zoo: deterministic data, the micro build end to end, and (slow) the full zoo's gates."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.modelio import load_model, load_tokenizer
from evomerge.resources import CONF_DIR
from evomerge.zoo import corpus
from evomerge.zoo.build import ZooSpec, build_zoo, zoo_dir

CONF = CONF_DIR / "zoo"


def micro_spec() -> ZooSpec:
    return ZooSpec.from_dict(yaml.safe_load((CONF / "micro.yaml").read_text()))


def test_task_splits_are_deterministic_and_disjoint():
    first = corpus.task_splits("toy_ja_math", 0, {"search": 50, "test": 50})
    again = corpus.task_splits("toy_ja_math", 0, {"search": 50, "test": 50})
    assert first == again
    search = {e.question for e in first["search"]}
    assert len(search) == 50 and not search & {e.question for e in first["test"]}


def test_training_examples_never_repeat_held_out_questions():
    held_out = {e.question for e in corpus.task_splits("toy_en_math", 0, {"test": 200})["test"]}
    train = corpus.training_examples("toy_en_math", 0, 2000, held_out)
    assert len(train) == 2000 and not held_out & {e.question for e in train}


def test_examples_carry_the_right_answers():
    rng = __import__("random").Random(3)
    for _ in range(50):
        p = corpus.sample_problem(rng)
        assert p.result == (p.a + p.b if p.add else p.a - p.b) and p.result >= 1
        assert corpus.ja_math_answer(p).endswith(f"答えは{p.result}{corpus.ITEMS[p.item][2]}です。")
    example = corpus.ja_qa_example(rng)
    assert example.answer in example.question and example.answer in example.completion


def test_spec_hash_tracks_every_setting():
    spec = micro_spec()
    assert spec.hash == micro_spec().hash
    changed = ZooSpec.from_dict({**yaml.safe_load((CONF / "micro.yaml").read_text()), "seed": 1})
    assert changed.hash != spec.hash


def test_unknown_zoo_setting_is_named():
    with pytest.raises(ValueError, match="hidden_sise"):
        ZooSpec.from_dict({"hidden_sise": 3})


def test_whole_model_experts_hash_as_before_block_ranges_existed():
    values = yaml.safe_load((CONF / "micro.yaml").read_text())
    spec = ZooSpec.from_dict(values)
    assert all("layers" not in expert for expert in spec.to_dict()["experts"].values())
    explicit = {**values, "experts": {name: {**e, "layers": None} for name, e in values["experts"].items()}}
    assert ZooSpec.from_dict(explicit).hash == spec.hash
    ja_expert = {**values["experts"]["ja_expert"], "layers": [0, 1]}
    ranged = {**values, "experts": {**values["experts"], "ja_expert": ja_expert}}
    assert ZooSpec.from_dict(ranged).hash != spec.hash


@pytest.mark.parametrize("layers", [[0, 3], [1, 1], [-1, 1]])
def test_expert_block_range_outside_the_model_is_named(layers):
    values = yaml.safe_load((CONF / "micro.yaml").read_text())
    values["experts"]["math_expert"]["layers"] = layers
    with pytest.raises(ValueError, match=r"zoo expert math_expert: layers \[.*\) is not a block range of a 2-layer"):
        ZooSpec.from_dict(values)


def test_experts_with_block_ranges_change_only_their_blocks(tmp_path):
    """The DFS zoo's experts (conf/zoo/dfs.yaml) fine-tune one block range each: every other tensor -- the other
    blocks, embeddings, final norm, head -- stays the base's to the bit, and the range's own blocks move."""
    values = yaml.safe_load((CONF / "micro.yaml").read_text())
    values["experts"]["ja_expert"]["layers"] = [0, 1]
    values["experts"]["math_expert"]["layers"] = [1, 2]
    path = build_zoo(ZooSpec.from_dict(values), tmp_path)
    base = load_model(path / "base").state_dict()
    for name, block in (("ja_expert", "model.layers.0."), ("math_expert", "model.layers.1.")):
        expert = load_model(path / name).state_dict()
        moved = {key for key, value in expert.items() if not value.equal(base[key])}
        assert moved == {key for key in base if key.startswith(block)}, name


def test_micro_zoo_builds_loads_and_is_cached(tmp_path):
    spec = micro_spec()
    path = build_zoo(spec, tmp_path)
    assert path == zoo_dir(spec, tmp_path) and not path.with_name(path.name + ".partial").exists()
    report = json.loads((path / "zoo_report.json").read_text())
    assert set(report["models"]) == {"base", "ja_expert", "math_expert"}
    for scores in report["models"].values():
        assert set(scores) == {"toy_ja_qa", "toy_en_math", "toy_ja_math", "toy_two_skill"}
        assert all(s["split"] == "test" and 0 <= s["score"] <= 1 for s in scores.values())
    assert report["merge_probe"]["chosen_on"] == "search"
    model = load_model(path / "math_expert")
    tokenizer = load_tokenizer(path / "math_expert")
    assert model.config.model_type == "mistral" and len(tokenizer) == model.config.vocab_size
    stamp = (path / "zoo_report.json").stat().st_mtime_ns
    assert build_zoo(spec, tmp_path) == path and (path / "zoo_report.json").stat().st_mtime_ns == stamp


def test_zoo_gates_fail_where_a_skill_or_the_merge_margin_is_missing():
    from evomerge.zoo.report import GATES, gate_results

    def report(ja_qa=1.0, en_math=0.94, probe=0.74):
        scores = {"ja_expert": (ja_qa, 0.02), "math_expert": (0.0, en_math)}
        models = {name: {"toy_ja_qa": {"acc_ja": qa}, "toy_en_math": {"acc": math},
                         "toy_two_skill": {"score": (qa + math) / 2}} for name, (qa, math) in scores.items()}
        return {"models": models, "merge_probe": {"tasks": {"toy_two_skill": {"score": probe}}}}

    assert gate_results(report()) == dict.fromkeys(GATES, True)
    assert [name for name, ok in gate_results(report(ja_qa=0.85)).items() if not ok] == [
        "ja_expert masters toy_ja_qa (acc_ja >= 0.9)"]
    assert [name for name, ok in gate_results(report(probe=0.55)).items() if not ok] == [
        "merge probe >= better expert + 0.10 on toy_two_skill"]
