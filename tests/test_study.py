"""The merging-at-scale study (issue 8) in miniature: micro zoo, two experts, one method; study-zoo data rules."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from evomerge.cli import main
from evomerge.resources import CONF_DIR
from evomerge.study.command import study
from evomerge.study.run import expert_subsets, load_pool, method_grid, normalized
from evomerge.zoo import corpus
from evomerge.zoo.build import ZooSpec
from evomerge.zoo.study_tasks import (
    STUDY_EXAMPLES,
    instruction_pairs,
    study_task_splits,
    study_training_examples,
)
from evomerge.zoo.study_zoo import (
    StudyZooSpec,
    _pretraining_questions,
    load_study_zoo_spec,
)

CONF = CONF_DIR


def _settings(**changes):
    settings = yaml.safe_load((CONF / "study" / "default.yaml").read_text())
    settings.update(zoo="micro", sizes=[2], subsets=1, methods={"linear": {}}, **changes)
    return settings


def test_study_zoos_stand_on_the_default_zoos_unchanged():
    """The study must not change the default zoo: its foundation is exactly the spec `evomerge search` builds
    (hence the same directory), and the micro study zoo's is the micro zoo's."""
    for study_file, zoo_file in [("study.yaml", "full.yaml"), ("study_micro.yaml", "micro.yaml")]:
        foundation = load_study_zoo_spec(yaml.safe_load((CONF / "zoo" / study_file).read_text())).foundation_spec
        zoo = ZooSpec.from_dict(yaml.safe_load((CONF / "zoo" / zoo_file).read_text()))
        assert foundation.to_dict() == zoo.to_dict() and foundation.hash == zoo.hash


def test_tiny_study_on_the_micro_zoo(micro_zoo_home, tmp_path):
    out = tmp_path / "run"
    summary = study(_settings(), micro_zoo_home, out, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["kind"] == "plain" and record["n"] == 2 and record["method"] == "linear"
    assert sorted(record["subset"]) == ["toy_en_math", "toy_ja_qa"]
    assert set(record["held_out"]) == {"toy_ja_math"}
    pool = load_pool("micro", micro_zoo_home)
    kind = pool.kinds[0]
    own = {t: kind.expert_scores[t][t] for t in record["subset"]}
    ratios = [record["held_in"][t] / own[t] for t in record["subset"] if own[t] > 0]  # each task by its own expert
    # (the micro zoo's experts may score 0 on their own tasks: then there is no ratio to take, and no norm)
    assert record["held_in_norm"] == (pytest.approx(sum(ratios) / len(ratios)) if ratios else None)
    assert summary["cells"]["plain"]["linear"]["2"]["subsets"] == 1
    for name in ("summary.json", "study.md", "study_methods.png", "study_base_kinds.png"):
        assert (out / name).stat().st_size > 0
    assert "| plain | linear |" in (out / "study.md").read_text()
    # a second run over the same directory reuses the merge instead of doing it again
    again = study(_settings(), micro_zoo_home, out, log=lambda *_: None)
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert again["cells"] == summary["cells"]


def test_study_command_line(micro_zoo_home, tmp_path):
    out = tmp_path / "cli"
    main(["study", f"home={micro_zoo_home}", f"hydra.run.dir={out}", "+study.zoo=micro", "+study.sizes=[2]",
          "+study.subsets=1", "+study.methods={task_arithmetic: {lambda: [0.5, 1.0]}}"])
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["method"] == "task_arithmetic" and len(record["grid"]) == 2
    scores = {point["values"]["lambda"]: point["score"] for point in record["grid"]}
    assert sorted(scores) == [0.5, 1.0] and scores[record["values"]["lambda"]] == max(scores.values())


def test_subsets_are_distinct_seeded_and_shared():
    tasks = [f"t{i}" for i in range(8)]
    first = expert_subsets(tasks, 4, 3, seed=0)
    assert first == expert_subsets(list(reversed(tasks)), 4, 3, seed=0)
    assert len(set(first)) == 3 and all(len(s) == 4 for s in first)
    assert expert_subsets(tasks, 8, 3, seed=0) == [tuple(tasks)]
    assert method_grid("ties", {"density": 0.5, "lambda": [0.6, 1.0]}) == [
        {"density": 0.5, "lambda": 0.6}, {"density": 0.5, "lambda": 1.0}]


def test_normalization_skips_zero_references():
    value, skipped = normalized({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0})
    assert value == 0.5 and skipped == ["b"]


@pytest.mark.parametrize("task", sorted(STUDY_EXAMPLES))
def test_study_task_rows_are_scored_right_by_their_task(task):
    """Each generator's completion is what an expert writes: the task's own scorer marks it correct."""
    from evomerge.eval.task import load_task

    spec = load_task(task, {"zoo_dir": "/nowhere"})
    rng = random.Random(5)
    examples = [STUDY_EXAMPLES[task](rng) for _ in range(30)]
    scores = spec.score([e.completion for e in examples], [e.answer for e in examples])
    assert all(s.correct for s in scores)
    shifted = spec.score([e.completion for e in examples[1:]], [e.answer for e in examples[:-1]])
    assert not all(s.correct for s in shifted)


def test_study_data_never_reaches_training():
    micro = load_study_zoo_spec(yaml.safe_load((CONF / "zoo" / "study_micro.yaml").read_text()))
    pretraining = _pretraining_questions(micro.foundation_spec)
    splits = study_task_splits("toy_en_qa", 0, {"search": 20, "test": 40}, pretraining)
    held = {e.question for rows in splits.values() for e in rows}
    assert len(held) == 60 and not held & pretraining
    assert not {q for q, _ in instruction_pairs(0, 500, held)} & {f"Q: {q}\nA:" for q in held}
    # translation: a held-out sentence is kept out of training on both sides
    en_ja = study_task_splits("toy_en_ja", 0, {"test": 50}, set())["test"]
    keys = {e.question for e in en_ja} | {e.answer for e in en_ja}
    train = study_training_examples("toy_ja_en", 0, 300, keys)
    assert not {e.question for e in train} & keys and not {e.answer for e in train} & keys
    # default-zoo tasks keep the default generators and streams
    assert study_training_examples("toy_en_math", 0, 20, set()) == corpus.training_examples("toy_en_math", 0, 20, set())


def test_study_zoo_spec_hash_covers_the_foundation():
    values = yaml.safe_load((CONF / "zoo" / "study.yaml").read_text())
    spec = load_study_zoo_spec(values)
    other = load_study_zoo_spec({**values, "foundation": "micro"})
    assert spec.foundation_spec.hash != other.foundation_spec.hash and spec.hash != other.hash
    with pytest.raises(ValueError, match="toy_nope"):
        StudyZooSpec.from_dict({"held_in": ["toy_nope"]})


def test_the_micro_study_zoo_builds_on_its_foundation(micro_zoo_home):
    pool = load_pool("study_micro", micro_zoo_home)  # built here, on the micro zoo the session already has
    assert [kind.name for kind in pool.kinds] == ["plain", "it"]
    assert pool.held_in == ("toy_ja_qa", "toy_en_math", "toy_sort", "toy_en_ja") and pool.held_out == ("toy_ja_math", "toy_max")
    for kind in pool.kinds:
        assert (kind.base / "model.safetensors").is_file()
        assert sorted(kind.experts) == sorted(pool.held_in) and all(p.is_dir() for p in kind.experts.values())
        assert set(kind.expert_scores) == set(pool.held_in)
    build = json.loads((pool.zoo / "build.json").read_text())
    assert set(build["seconds"]) == {"write_data", "copy_base", "instruct_base", "train_experts", "report"}
    assert not pool.zoo.with_name(pool.zoo.name + ".partial").exists()
    assert load_pool("study_micro", micro_zoo_home).zoo == pool.zoo  # found, not built again
