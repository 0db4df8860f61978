"""The merging-at-scale study (issues 8, 21) in miniature: micro zoo runs of the pipeline, the study-zoo data rules,
and the bootstrap behind every interval and verdict on synthetic rows whose answer is known."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.modelio import load_model
from evomerge.resources import CONF_DIR
from evomerge.study.command import study
from evomerge.study.intervals import Draws, combined, interval, verdict
from evomerge.study.run import EVOLVED, BaseKind, expert_gate, expert_subsets, load_pool, method_grid, normalized
from evomerge.study.summary import report_markdown, summarize
from evomerge.zoo import corpus
from evomerge.zoo.build import ZooSpec, build_zoo, zoo_dir
from evomerge.zoo.study_tasks import (
    COMPLETION,
    STUDY_EXAMPLES,
    Pretraining,
    instruction_pairs,
    study_task_splits,
    study_training_examples,
)
from evomerge.zoo.study_zoo import (
    StudyZooSpec,
    _pretraining,
    build_study_zoo,
    load_study_zoo_spec,
)

CONF = CONF_DIR


def _settings(**changes):
    settings = yaml.safe_load((CONF / "study" / "default.yaml").read_text())
    # held_out_min_right 0: the micro zoo's 8-question splits make every normalizer a handful of answers
    settings.update({"zoos": ["micro"], "sizes": [2], "subsets": 1, "methods": {"linear": {}}, "held_out_min_right": 0,
                     "evolved": {**settings["evolved"], "generations": 2, "popsize": 3}, **changes})
    return settings


def test_study_zoos_stand_on_the_default_zoos_unchanged():
    """The study must not change the default zoo: its foundation is exactly the spec `evomerge search` builds
    (hence the same directory), and the micro study zoo's is the micro zoo's."""
    for study_file, zoo_file in [("study.yaml", "full.yaml"), ("study_micro.yaml", "micro.yaml"),
                                 ("study_4x.yaml", "full_4x.yaml")]:
        foundation = load_study_zoo_spec(yaml.safe_load((CONF / "zoo" / study_file).read_text())).foundation_spec
        zoo = ZooSpec.from_dict(yaml.safe_load((CONF / "zoo" / zoo_file).read_text()))
        assert foundation.to_dict() == zoo.to_dict() and foundation.hash == zoo.hash


def test_tiny_study_on_the_micro_zoo(micro_zoo_home, tmp_path):
    out = tmp_path / "run"
    summary = study(_settings(), micro_zoo_home, out, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["linear", EVOLVED]
    record = records[0]
    assert record["kind"] == "plain" and record["n"] == 2
    assert sorted(record["subset"]) == ["toy_en_math", "toy_ja_qa"]
    assert set(record["held_out"]) == {"toy_ja_math"}
    # every test question's outcome is kept, and the scores are their means (what the bootstrap resamples)
    assert set(record["rows"]) == {"toy_en_math", "toy_ja_qa", "toy_ja_math"}
    for task, rows in record["rows"].items():
        assert len(rows) == 8 and set(rows) <= {0, 1}
        assert {**record["held_in"], **record["held_out"]}[task] == pytest.approx(sum(rows) / len(rows))
    pool = load_pool("micro", micro_zoo_home)
    kind = pool.kinds[0]
    own = {t: kind.expert_scores[t][t] for t in record["subset"]}
    ratios = [record["held_in"][t] / own[t] for t in record["subset"] if own[t] > 0]  # each task by its own expert
    # (the micro zoo's experts may score 0 on their own tasks: then there is no ratio to take, and no norm)
    assert record["held_in_norm"] == (pytest.approx(sum(ratios) / len(ratios)) if ratios else None)
    # the evolved column: CMA-ES over one weight per expert, generations x popsize merges on the search split
    evolved = records[1]
    assert len(evolved["grid"]) == 2 * 3 and {g["generation"] for g in evolved["grid"]} == {0, 1}
    assert len(evolved["values"]["weight"]) == 2
    best = max(evolved["grid"], key=lambda g: g["score"])  # the first of the best (the micro experts tie at 0)
    assert evolved["values"] == {**best["values"], "search_score": best["score"]}
    cell = summary["cells"]["plain"]["linear"]["2"]
    assert cell["subsets"] == 1 and set(cell["held_in_norm"]) == {"value", "low", "high"}
    for name in ("summary.json", "study.md", "study_methods.png", "study_base_kinds.png"):
        assert (out / name).stat().st_size > 0
    assert "| plain | linear |" in (out / "study.md").read_text()
    # a second run over the same directory reuses the merges instead of doing them again
    again = study(_settings(), micro_zoo_home, out, log=lambda *_: None)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert again["cells"] == summary["cells"]
    # a run directory belongs to its zoo: merges of another (rebuilt, changed) zoo are never reused
    lines = (out / "results.jsonl").read_text().splitlines()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "results.jsonl").write_text("\n".join(lines[:1] + [json.dumps({**json.loads(lines[1]), "zoo": "zoo-x"})]))
    with pytest.raises(ValueError, match="its plain merges come from zoo-x, this study's is zoo-micro-"):
        study(_settings(), micro_zoo_home, moved, log=lambda *_: None)
    # a study is deterministic: a fresh run directory gives the same records (timings aside)
    fresh = tmp_path / "again"
    study(_settings(), micro_zoo_home, fresh, log=lambda *_: None)
    def timeless(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "results.jsonl").read_text().splitlines()]

    assert timeless(fresh) == timeless(out)


def test_two_model_sizes_share_one_run(micro_zoo_home, tmp_path):
    """`zoos` lists one zoo per model size: the second's kinds are named after it, merged on the same subsets and
    scored on the same questions, so finding 2 is a paired difference (here the same zoo twice: exactly 0)."""
    out = tmp_path / "sizes"
    summary = study(_settings(zoos=["micro", "micro"], evolved=None), micro_zoo_home, out, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["subset"]) for r in records] == [("plain", ["toy_en_math", "toy_ja_qa"]),
                                                           ("plain@micro", ["toy_en_math", "toy_ja_qa"])]
    assert records[0]["rows"] == records[1]["rows"]
    assert [zoo["kinds"] for zoo in summary["zoos"]] == [["plain"], ["plain@micro"]]
    second = summary["findings"][1]
    assert second["verdict"] != "not measured"
    assert all(p["value"] in (0, None) and p["low"] in (0, None) and p["high"] in (0, None) for p in second["parts"])
    assert "Model sizes: micro" in (out / "study.md").read_text()


def test_study_command_line(micro_zoo_home, tmp_path):
    out = tmp_path / "cli"
    main(["study", f"home={micro_zoo_home}", f"hydra.run.dir={out}", "+study.zoos=[micro]", "+study.sizes=[2]",
          "+study.subsets=1", "+study.methods={task_arithmetic: {lambda: [0.5, 1.0]}}", "+study.evolved=null",
          "+study.held_out_min_right=0"])
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["method"] == "task_arithmetic" and len(record["grid"]) == 2
    scores = {point["values"]["lambda"]: point["score"] for point in record["grid"]}
    assert sorted(scores) == [0.5, 1.0] and scores[record["values"]["lambda"]] == max(scores.values())
    assert len((out / "results.jsonl").read_text().splitlines()) == 1  # evolved=null: no evolved column


@pytest.mark.slow
def test_the_quick_study_runs_every_stage(micro_zoo_home, tmp_path):
    """`evomerge study study=quick`, the CI-size variant: both base kinds, N in {2, 4}, 3 subsets where there are
    that many, two uniform methods and the evolved column, summarized with intervals and verdicts."""
    out = tmp_path / "quick"
    main(["study", "study=quick", f"home={micro_zoo_home}", f"hydra.run.dir={out}", "progress=false"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == (3 + 1) * 2 * 3  # subsets (N=2: 3, N=4: the one) x kinds x columns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subsets"]["2"] and len(summary["subsets"]["2"]) == 3 and len(summary["subsets"]["4"]) == 1
    assert set(summary["cells"]["it"]) == {"linear", "task_arithmetic", EVOLVED}
    assert [f["title"][:2] for f in summary["findings"]] == ["1.", "2.", "3.", "4.", "5."]
    assert all(f["verdict"] in {"agrees", "disagrees", "undetermined", "not measured"} for f in summary["findings"])
    assert "Expert gate" in (out / "study.md").read_text()


@pytest.mark.parametrize("given, problem", [
    ({"sizes": "two"}, "study.sizes='two': Input should be a valid list"),
    ({"sizes": [0, 2]}, "study.sizes.0=0: Input should be greater than or equal to 1"),
    ({"zoo": "study"}, "study.zoo='study': Extra inputs are not permitted"),
    ({"evolved": {"popsize": 1}}, "study.evolved.popsize=1: Input should be greater than or equal to 2"),
])
def test_bad_study_settings_are_named_in_one_line(given, problem):
    from omegaconf import OmegaConf

    from evomerge.study.command import study_settings

    with pytest.raises(ValueError, match=problem.replace(".", r"\.").replace("(", r"\(")) as caught:
        study_settings(OmegaConf.create({"study": given}))
    assert "\n" not in str(caught.value)


def test_study_settings_merge_evolved_and_replace_methods():
    from omegaconf import OmegaConf

    from evomerge.study.command import study_settings

    settings = study_settings(OmegaConf.create({"study": {"methods": {"linear": {}}, "evolved": {"popsize": 4}}}))
    assert settings["methods"] == {"linear": {}}
    assert settings["evolved"]["popsize"] == 4 and settings["evolved"]["generations"] == 3


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
    pretraining = _pretraining(micro.foundation_spec)
    splits = study_task_splits("toy_en_qa", 0, {"search": 20, "test": 40}, pretraining)
    held = {e.question for rows in splits.values() for e in rows}
    assert len(held) == 60 and not held & pretraining.questions
    # a held-out completion (the base's pretraining form) is never a piece of pretraining text
    for task in COMPLETION:
        rows = study_task_splits(task, 0, {"test": 40}, pretraining)["test"]
        assert not any(e.question in pretraining.text for e in rows)
        # a row the text holds is skipped: the same draw against a text that contains its first row
        seen = Pretraining(frozenset(), pretraining.text + "\n\n" + rows[0].question + rows[0].completion)
        assert study_task_splits(task, 0, {"test": 40}, seen)["test"] == rows[1:] + [
            study_task_splits(task, 0, {"test": 41}, pretraining)["test"][-1]]
    assert not {q for q, _ in instruction_pairs(0, 500, held)} & {f"Q: {q}\nA:" for q in held}
    # translation: a held-out sentence is kept out of training on both sides
    en_ja = study_task_splits("toy_en_ja", 0, {"test": 50}, Pretraining(frozenset(), ""))["test"]
    keys = {e.question for e in en_ja} | {e.answer for e in en_ja}
    train = study_training_examples("toy_ja_en", 0, 300, keys)
    assert not {e.question for e in train} & keys and not {e.answer for e in train} & keys
    # default-zoo tasks keep the default generators and streams
    assert study_training_examples("toy_en_math", 0, 20, set()) == corpus.training_examples("toy_en_math", 0, 20, set())


def test_study_zoo_spec_hash_covers_the_foundation():
    values = yaml.safe_load((CONF / "zoo" / "study.yaml").read_text())
    spec = load_study_zoo_spec(values)
    other = load_study_zoo_spec({**values, "foundation": "micro"})
    # the second model size is the same recipe on a ~4x larger foundation, and nothing else
    larger = load_study_zoo_spec(yaml.safe_load((CONF / "zoo" / "study_4x.yaml").read_text()))
    assert dataclasses.replace(larger, variant=spec.variant, foundation=spec.foundation) == spec
    assert (larger.foundation_spec.hidden_size, larger.foundation_spec.intermediate_size) == (256, 768)
    assert spec.foundation_spec.hash != other.foundation_spec.hash and spec.hash != other.hash
    with pytest.raises(ValueError, match="toy_nope"):
        StudyZooSpec.from_dict({"held_in": ["toy_nope"]})


def test_the_micro_study_zoo_builds_on_its_foundation(micro_zoo_home):
    pool = load_pool("study_micro", micro_zoo_home)  # built here, on the micro zoo the session already has
    assert [kind.name for kind in pool.kinds] == ["plain", "it"]
    assert pool.held_in == ("toy_ja_qa", "toy_en_math", "toy_sort", "toy_en_ja")
    assert pool.held_out == ("toy_ja_math", "toy_equations")
    for kind in pool.kinds:
        assert (kind.base / "model.safetensors").is_file()
        assert sorted(kind.experts) == sorted(pool.held_in) and all(p.is_dir() for p in kind.experts.values())
        assert set(kind.expert_scores) == set(pool.held_in)
    assert pool.parameters == sum(p.numel() for p in load_model(pool.kinds[0].base).parameters())  # from headers
    build = json.loads((pool.zoo / "build.json").read_text())
    assert set(build["seconds"]) == {"write_data", "copy_base", "instruct_base", "train_experts", "report"}
    assert not pool.zoo.with_name(pool.zoo.name + ".partial").exists()
    assert load_pool("study_micro", micro_zoo_home).zoo == pool.zoo  # found, not built again


def test_a_study_zoo_builds_only_its_foundations_base(tmp_path):
    """Without a cached foundation, a study zoo builds the foundation's data and base only (its experts and report
    are no part of the study: 1,100 fine-tuning steps at the second size); a later foundation build resumes there."""
    study_zoo = build_study_zoo(load_study_zoo_spec(yaml.safe_load((CONF / "zoo" / "study_micro.yaml").read_text())),
                                tmp_path)
    assert (study_zoo / "zoo_report.json").is_file()
    micro = ZooSpec.from_dict(yaml.safe_load((CONF / "zoo" / "micro.yaml").read_text()))
    partial = zoo_dir(micro, tmp_path).with_name(zoo_dir(micro, tmp_path).name + ".partial")
    assert sorted(p.name for p in partial.iterdir()) == ["base", "data"]
    base = partial / "base" / "model.safetensors"
    built = base.stat().st_mtime_ns
    assert (study_zoo / "base" / "model.safetensors").read_bytes() == base.read_bytes()
    final = build_zoo(micro, tmp_path)
    assert (final / "base" / "model.safetensors").stat().st_mtime_ns == built  # resumed, not trained again
    assert (final / "zoo_report.json").is_file() and not partial.exists()


# ---- the bootstrap: synthetic rows whose answer is known ----


def _bernoulli(rng: np.random.Generator, p: float, n: int = 200) -> list[int]:
    return [int(x) for x in rng.random(n) < p]


def _synthetic(plain_p: float, it_p: float, seed: int = 0, larger: dict[str, float] | None = None):
    """Two base kinds, three held-in tasks with perfect experts, one held-out task, N in {1, 2}; the merges' held-in
    rows are right with probability plain_p / it_p; the held-out rows are the same rows for every kind. `larger`:
    the kinds of a second model size ("plain@big": p, ...)."""
    rng = np.random.default_rng(seed)
    held_in, held_out = ["a", "b", "c"], ["x"]
    base_out = _bernoulli(rng, 0.5)
    probabilities = {"plain": plain_p, "it": it_p, **(larger or {})}
    zoos = [{"name": "small", "parameters": 10**6, "kinds": ["plain", "it"]}]
    if larger:
        zoos.append({"name": "big", "parameters": 4 * 10**6, "kinds": list(larger)})
    info = {"held_in": held_in, "held_out": held_out, "gate": None, "zoos": zoos, "references": {
        kind: {"base_rows": {**{t: _bernoulli(rng, 0.1) for t in held_in}, "x": base_out},
               "expert_rows": {t: {t: [1] * 200, "x": base_out} for t in held_in}} for kind in probabilities}}
    records = []
    merged_out = _bernoulli(rng, 0.6)
    for n, subsets in {1: [["a"], ["b"], ["c"]], 2: [["a", "b"], ["a", "c"], ["b", "c"]]}.items():
        for subset in subsets:
            for kind, p in probabilities.items():
                for method in ("linear", "ties"):
                    rows = {**{t: _bernoulli(rng, p) for t in subset}, "x": merged_out}
                    records.append({"kind": kind, "n": n, "subset": subset, "method": method, "rows": rows})
    return records, info


def test_a_held_out_task_of_a_handful_of_base_answers_is_left_out():
    """A second held-out task that one base answers 9 of 200 questions of is left out of every kind's held-out
    mean (the cells are those of a study without it) and named with its count; at 10 right answers it counts."""
    records, info = _synthetic(0.5, 0.5)
    without = summarize(records, info, held_out_min_right=10)
    rng = np.random.default_rng(5)
    for ref in info["references"].values():
        ref["base_rows"]["y"] = _bernoulli(rng, 0.5)
        for by_task in ref["expert_rows"].values():
            by_task["y"] = _bernoulli(rng, 0.3)
    info["references"]["it"]["base_rows"]["y"] = [1] * 9 + [0] * 191
    info["held_out"] = ["x", "y"]
    for record in records:
        record["rows"]["y"] = _bernoulli(rng, 0.5)
    summary = summarize(records, info, held_out_min_right=10)
    assert summary["held_out"] == ["x"] and summary["held_out_left_out"] == {"y": {"it": [9, 200]}}
    def values(summary):  # point estimates (the bootstrap also draws y's questions, so its replicates differ)
        return [(kind, method, n, metric, cell[metric]["value"]) for kind, methods in summary["cells"].items()
                for method, by_n in methods.items() for n, cell in by_n.items() for metric in ("held_in_norm",
                                                                                              "held_out_norm")]

    assert values(summary) == values(without)
    assert ("Left out of every held-out mean, for all base kinds and sizes (a base answers fewer than 10 of its "
            "questions: a normalizer of a handful of answers): y (it 9 of 200).") in report_markdown(summary)
    info["references"]["it"]["base_rows"]["y"][9] = 1
    kept = summarize(records, info, held_out_min_right=10)
    assert kept["held_out"] == ["x", "y"] and not kept["held_out_left_out"]
    assert values(kept) != values(without)
    with pytest.raises(ValueError, match="every held-out task has a base answering fewer than 300"):
        summarize(records, info, held_out_min_right=300)


def test_bootstrap_intervals_cover_what_the_rows_say():
    """One subset of one task answered at p = 0.5 by a merge, by an expert at 1.0: the interval is the binomial one
    (±1.96·sqrt(.25/200) ≈ ±0.069); identical rows compared through the shared draws differ by exactly 0."""
    rng = np.random.default_rng(1)
    rows = _bernoulli(rng, 0.5)
    draws = Draws({"a": 200}, {1: 1})
    score = draws.score("a", rows)
    assert score[0] == pytest.approx(np.mean(rows))  # replicate 0 is the point estimate
    estimate = interval(score)
    assert estimate["high"] - estimate["low"] == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(200), rel=0.15)
    assert estimate["low"] < np.mean(rows) < estimate["high"]
    assert np.all(draws.score("a", rows) - draws.score("a", list(rows)) == 0)  # paired: the same questions
    assert interval(draws.score("a", [0] * 200) - score)["high"] < 0


def test_verdicts_come_from_intervals():
    assert verdict({"value": 0.1, "low": 0.02, "high": 0.2}) == "agrees"
    assert verdict({"value": 0.1, "low": -0.02, "high": 0.2}) == "undetermined"
    assert verdict({"value": -0.1, "low": -0.2, "high": -0.01}) == "disagrees"
    assert verdict({"value": None, "low": None, "high": None}) == "undetermined"
    assert combined(["agrees", "agrees"]) == "agrees"
    assert combined(["agrees", "undetermined"]) == "undetermined"
    assert combined(["agrees", "disagrees"]) == "disagrees"


@pytest.mark.parametrize("plain_p, it_p, expected", [(0.5, 0.9, "agrees"), (0.9, 0.5, "disagrees"),
                                                     (0.7, 0.7, "undetermined")])
def test_a_finding_says_what_its_interval_says(plain_p, it_p, expected):
    """Finding 1 (instruction-tuned base merges better): held-in it − plain clearly above, clearly below, or at 0;
    held-out is the same rows for both kinds, so its difference is exactly 0 in every replicate (undetermined)."""
    records, info = _synthetic(plain_p, it_p)
    summary = summarize(records, info)
    first = summary["findings"][0]
    held_in, held_out = first["parts"]
    assert held_in["verdict"] == expected
    assert held_out["low"] == held_out["high"] == 0 and held_out["verdict"] == "undetermined"
    assert first["verdict"] == ("disagrees" if expected == "disagrees" else "undetermined")
    cell = summary["cells"]["it"]["linear"]["2"]
    assert cell["subsets"] == 3 and cell["held_in_norm"]["low"] < it_p < cell["held_in_norm"]["high"]
    assert f"The miniature **{first['verdict']}**" in report_markdown(summary)


@pytest.mark.parametrize("small_p, big_p, expected", [(0.5, 0.9, "agrees"), (0.9, 0.5, "disagrees")])
def test_finding_2_compares_the_model_sizes(small_p, big_p, expected):
    """Finding 2 (larger models merge better): a larger size whose merges are clearly better or worse held-in;
    held-out is the same rows at both sizes, so its difference is exactly 0. The other findings stay at the
    first size: its kinds' numbers are the same with or without the larger size beside them."""
    records, info = _synthetic(small_p, small_p, larger={"plain@big": big_p, "it@big": big_p})
    summary = summarize(records, info)
    second = summary["findings"][1]
    assert [p["verdict"] for p in second["parts"]] == [expected, "undetermined"] * 2
    assert "big (4.00M) − small (1.00M), held-in" in second["parts"][0]["label"]
    assert all(p["low"] == p["high"] == 0 for p in second["parts"][1::2])
    alone, alone_info = _synthetic(small_p, small_p)
    assert summarize(alone, alone_info)["findings"][1]["verdict"] == "not measured"
    assert summary["cells"]["plain@big"]["linear"]["2"]["subsets"] == 3
    small_only = [r for r in records if "@" not in r["kind"]]
    assert summarize(small_only, info)["findings"][2:] == summary["findings"][2:]
    # a run cut short before the larger size reached N=2 compares the sizes at N=1 only
    cut = [r for r in records if "@" not in r["kind"] or r["n"] == 1]
    cut_summary = summarize(cut, info)
    parts = cut_summary["findings"][1]["parts"]
    assert "N=1)" in parts[0]["label"] and [p["verdict"] for p in parts] == [expected, "undetermined"] * 2

    def at_1(kind):
        return np.mean([cut_summary["cells"][kind][m]["1"]["held_in_norm"]["value"] for m in ("linear", "ties")])

    assert parts[0]["value"] == pytest.approx(at_1("plain@big") - at_1("plain"), abs=1e-3)


def test_intervals_resample_the_subsets_too():
    """Two subsets, one merged perfectly and one not at all, with no question noise: the cell's interval spans
    both (a question-only bootstrap would give the point)."""
    info = {"held_in": ["a", "b"], "held_out": ["x"], "gate": None,
            "zoos": [{"name": "z", "parameters": 10**6, "kinds": ["plain"]}], "references": {"plain": {
        "base_rows": {"a": [0] * 50, "b": [0] * 50, "x": [1] * 50},
        "expert_rows": {"a": {"a": [1] * 50, "x": [1] * 50}, "b": {"b": [1] * 50, "x": [1] * 50}}}}}
    records = [{"kind": "plain", "n": 1, "subset": [t], "method": "linear",
                "rows": {t: [int(t == "a")] * 50, "x": [1] * 50}} for t in ("a", "b")]
    cell = summarize(records, info)["cells"]["plain"]["linear"]["1"]["held_in_norm"]
    assert cell["value"] == 0.5 and cell["low"] == 0.0 and cell["high"] == 1.0


def test_the_expert_gate_names_the_experts_below_it(tmp_path):
    def kind(name, a, b):
        return BaseKind(name, tmp_path, {}, {}, {"a": {"a": [1] * a + [0] * (100 - a)},
                                                "b": {"b": [1] * b + [0] * (100 - b)}})

    kinds = [kind("plain", 90, 50), kind("it@study_4x", 79, 100)]
    assert expert_gate(kinds, 0.8) == {"threshold": 0.8, "failed": {"plain/b": 0.5, "it@study_4x/a": 0.79}}


def test_an_old_results_file_is_refused_in_one_line():
    records, info = _synthetic(0.5, 0.5)
    del records[0]["rows"]
    with pytest.raises(ValueError, match="older evomerge study"):
        summarize(records, info)


def test_a_slope_uses_every_n():
    """A quantity that rises then falls back has a zero end-to-end difference but not a zero slope, and a straight
    line's slope is exact in every replicate."""
    from evomerge.study.intervals import slope

    line = [np.full(5, 0.1 * n) for n in (2, 4, 6, 8)]
    assert np.allclose(slope([2, 4, 6, 8], line), 0.1)
    bump = [np.full(3, v) for v in (0.0, 1.0, 0.0, 0.0)]
    assert np.allclose(slope([2, 4, 6, 8], bump), -0.05)
