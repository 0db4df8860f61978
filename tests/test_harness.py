"""lm-eval tasks as fitness: evomerge's answers to lm-eval's requests score what `lm_eval.simple_evaluate` with its
HF backend scores, on the custom tasks over local JSONL in tests/lm_eval_tasks (a generation task and a
multiple-choice task), and a search runs on them end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager

from evomerge.cli import main
from evomerge.errors import TaskError
from evomerge.eval.harness import HarnessEvaluator, HarnessLM, HarnessSettings, HarnessTask
from evomerge.eval.significance import row_values
from evomerge.modelio import load_model, load_tokenizer
from evomerge.resources import CONF_DIR
from evomerge.zoo.build import ZooSpec, build_zoo, zoo_dir

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["toy_arith", "toy_qa_choice"]


def harness_task(**settings) -> HarnessTask:
    return HarnessTask(HarnessSettings.load({"name": "lm_eval", "tasks": TASKS, "include_path": str(TASKS_DIR),
                                             **settings}))


def micro_zoo(home: Path) -> Path:
    return zoo_dir(ZooSpec.from_dict(yaml.safe_load((CONF_DIR / "zoo" / "micro.yaml").read_text())), home)


def assert_scores_match_lm_eval(model_dir: Path, split: str) -> dict:
    """evomerge's evaluation of the model on `split` against simple_evaluate's (HF backend) on the same docs: the
    same metrics, the same generations, the same log-likelihoods up to float32 summation order."""
    task = harness_task()
    evaluator = HarnessEvaluator(task, split, load_tokenizer(model_dir), progress=False, batch_size=16)
    ours = evaluator.evaluate(load_model(model_dir))
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                     tasks=TASKS, device="cpu", task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                     samples=evaluator.indices, bootstrap_iters=0)
    for name, objective in task.objectives.items():
        results = theirs["results"][name]
        assert ours.metrics[f"{name}/score"] == pytest.approx(float(results[objective.key]), abs=1e-12)
        for metric in task.tasks[name].aggregation():
            assert ours.metrics[f"{name}/{metric}"] == pytest.approx(float(results[f"{metric},{objective.filter}"]),
                                                                     abs=1e-12)
        rows = {sample["index"]: sample for sample in ours.samples if sample["task"] == name}
        logged = [row for row in theirs["samples"][name] if row["filter"] == objective.filter]
        assert sorted(rows) == sorted(row["doc_id"] for row in logged) == evaluator.indices[name]
        for row in logged:
            mine = rows[row["doc_id"]]
            assert mine["metrics"] == {m: float(row[m]) for m in task.tasks[name].aggregation()}
            assert mine["prompt"] == row["arguments"][0][0]
            if task.tasks[name].get_config("output_type") == "generate_until":
                assert mine["responses"] == [response for responses in row["resps"] for response in responses]
                assert mine["filtered"] == row["filtered_resps"]
            else:  # (log-likelihood, is greedy) per choice
                assert len(mine["responses"]) == len(row["filtered_resps"]) == 4
                for (value, greedy), (their_value, their_greedy) in zip(mine["responses"], row["filtered_resps"]):
                    assert value == pytest.approx(their_value, abs=1e-4) and greedy == their_greedy
    return ours.metrics


def test_scores_match_lm_eval_simple_evaluate_on_the_micro_zoo(micro_zoo_home):
    metrics = assert_scores_match_lm_eval(micro_zoo(micro_zoo_home) / "math_expert", "test")
    assert metrics["n"] == 120 and metrics["tokens"] > 0


def test_shared_contexts_score_what_whole_rows_score(micro_zoo_home):
    """The two scorers on the same requests: contexts read once with a KV cache for the choices (the usual path)
    and whole rows (for rows lm-eval cuts, and models without a KV cache)."""
    model_dir = micro_zoo(micro_zoo_home) / "ja_expert"
    lm = HarnessLM(load_tokenizer(model_dir), {"batch_size": 8, "max_padding": 0.1}, progress=False)
    lm.model = load_model(model_dir)
    rows = [json.loads(line) for line in (TASKS_DIR / "toy_qa_choice.jsonl").read_text().splitlines()[:12]]
    requests = [(None, *lm._encode_pair(f"質問：{row['question']}\n答え：", choice))
                for row in rows for choice in row["choices"]]
    requests.append((None, [lm.prefix_token_id], lm.tok_encode("答え", add_special_tokens=False)))  # empty context
    requests.append((None, requests[0][1], requests[0][2][:1]))  # a one-token continuation: no second forward
    contexts, continuations = [r[1] for r in requests], [r[2] for r in requests]
    assert len({len(c) for c in continuations}) > 1 and min(len(c) for c in continuations) == 1
    shared, whole = [(0.0, False)] * len(requests), [(0.0, False)] * len(requests)
    lm._score_shared(lm.model, range(len(requests)), contexts, continuations, shared)
    lm._score_whole(lm.model, range(len(requests)), contexts, continuations, whole)
    lone = len(requests) - 1
    lm._score_shared(lm.model, [lone], contexts, continuations, shared)  # a batch of one-token continuations only
    for (value, greedy), (other, other_greedy) in zip(shared, whole):
        assert value == pytest.approx(other, abs=1e-4) and greedy == other_greedy


def test_search_and_test_docs_are_a_seeded_cut_that_never_overlaps():
    task = harness_task()
    search, test = task.doc_indices("search"), task.doc_indices("test")
    for name in TASKS:
        assert not set(search[name]) & set(test[name])
        assert sorted(search[name] + test[name]) == list(range(120)) and len(search[name]) == 60
    assert harness_task().doc_indices("search") == search  # the same cut every time
    assert harness_task(split_seed=1).doc_indices("search") != search
    assert harness_task(search_fraction=0.25).doc_indices("search")["toy_arith"] != search["toy_arith"]
    with pytest.raises(TaskError, match="have the splits"):
        task.doc_indices("validation")


@pytest.mark.parametrize(("settings", "message"), [
    ({"tasks": ["no_such_task"]}, "lm-eval could not load task.tasks=['no_such_task']"),
    ({"metrics": {"toy_arith": "acc,none"}}, "lm-eval task 'toy_arith' has no metric 'acc,none'"),
    ({"metrics": {"toy_sort": "acc,none"}}, "task.metrics names ['toy_sort'], not tasks of this run"),
    ({"search_fraction": 1.0}, "task.search_fraction=1.0: Input should be less than 1"),
    ({"search_fraction": 0.001}, "search_fraction=0.001 leaves no search rows"),
    ({"include_path": "/no/such/dir"}, "task.include_path='/no/such/dir' is not a directory"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(TaskError) as error:
        task = harness_task(**settings)
        task.objectives, task.doc_indices("search")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("override", "message"), [
    ("generation_kwargs: {until: ['\\n'], do_sample: true}", "samples (do_sample: true); evomerge scores greedy"),
    ("output_type: loglikelihood_rolling", "is a loglikelihood_rolling task; evomerge scores generate_until"),
])
def test_sampling_and_perplexity_tasks_are_refused(tmp_path, override, message):
    (tmp_path / "toy_other.yaml").write_text(f"include: {TASKS_DIR / 'toy_arith.yaml'}\ntask: toy_other\n{override}\n")
    with pytest.raises(TaskError) as error:
        harness_task(tasks=["toy_other"], include_path=str(tmp_path)).tasks
    assert message in str(error.value)


def test_search_on_an_lm_eval_task_reports_on_its_test_docs(micro_zoo_home, tmp_path):
    run = tmp_path / "run"
    main(["search", "zoo=micro", f"home={micro_zoo_home}", f"hydra.run.dir={run}", "progress=false",
          "search.popsize=4", "search.generations=1", "task=lm_eval", f"task.tasks=[{','.join(TASKS)}]",
          f"task.include_path={TASKS_DIR}"])
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "lm_eval" and report["lm_eval"]["toy_arith"]["docs"] == {"search": 60, "test": 60}
    assert report["lm_eval"]["toy_qa_choice"]["fitness"] == "acc,none"
    assert {row["kind"] for row in report["rows"]} == {"source", "baseline", "best"}
    fitness = {row["name"]: row["metrics"]["fitness"] for row in report["rows"]}
    for row in report["rows"]:
        metrics = row["metrics"]
        assert metrics["fitness"] == pytest.approx((metrics["toy_arith/score"] + metrics["toy_qa_choice/score"]) / 2)
        assert metrics["n"] == 120 and metrics["split"] == "test"
    for paired in report["paired"]:  # per-row values average to the fitness: paired differences are its differences
        assert paired["n"] == 120
        assert paired["difference"] == pytest.approx(fitness["best (search)"] - fitness[paired["against"]], abs=1e-4)
    assert "lm_eval" in (run / "config.yaml").read_text()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(entry["metrics"]["n"] == 120 for entry in log)


def test_racing_an_lm_eval_task_is_refused(micro_zoo_home, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["search", "zoo=micro", f"home={micro_zoo_home}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false",
              "fitness=racing", "task=lm_eval", "task.tasks=[toy_arith]", f"task.include_path={TASKS_DIR}"])
    assert "fitness=racing races on evomerge's own tasks" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_scores_match_lm_eval_simple_evaluate_on_the_toy_zoo():
    """On the full toy zoo's experts, which answer these tasks: the match holds where the scores are not all 0."""
    home = Path(os.environ.get("EVOMERGE_HOME", "~/.cache/evomerge")).expanduser()
    zoo = build_zoo(ZooSpec.from_dict(yaml.safe_load((CONF_DIR / "zoo" / "full.yaml").read_text())), home)
    assert assert_scores_match_lm_eval(zoo / "math_expert", "test")["toy_arith/score"] >= 0.8
    assert_scores_match_lm_eval(zoo / "ja_expert", "search")


def test_per_row_values_average_to_the_score_when_tasks_have_different_row_counts():
    task = harness_task()
    samples = ([{"task": "toy_arith", "metrics": {"exact_match": value}} for value in (1.0, 0.0, 1.0, 1.0)]
               + [{"task": "toy_qa_choice", "metrics": {"acc": value, "acc_norm": 0.0}} for value in (0.0, 1.0)])
    values, outcomes = row_values(task, samples, "score")
    assert sum(values) / len(values) == pytest.approx((0.75 + 0.5) / 2)
    assert outcomes == [True, False, True, True, False, True]
    assert row_values(task, samples, "toy_qa_choice/acc_norm") == ([0.0, 0.0], [False, False])
