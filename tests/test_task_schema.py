"""The task YAML schema (pydantic models in evomerge.eval.task): each bad file is one TaskError line naming the
file, the key path and the problem; what it accepts loads as before."""

from __future__ import annotations

import pytest
import yaml

from evomerge.eval.harness import HARNESS_TASK, HarnessSettings
from evomerge.eval.task import CompositeTask, TaskError, load_task
from evomerge.resources import CONF_DIR

VALID = ("scorer: last_number\nprimary_metric: acc\nprompt: {template: 'Q: {question}'}\n"
         "generation: {max_new_tokens: 4, stop: ['\\n']}\nsplits: {test: {local: x.tsv}}\n")


def edited(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (edited("{template: 'Q: {question}'}", "{template: 'Q: {question}', tmpl: x}"),
         "prompt: unknown key(s) ['tmpl']; allowed: ['template']"),
        (edited("max_new_tokens: 4", "max_new_tokens: '4'"),
         "generation.max_new_tokens: Input should be a valid integer, got '4'"),
        (edited("max_new_tokens: 4", "max_new_tokens: true"), "generation.max_new_tokens: Input should be a valid integer"),
        (edited("max_new_tokens: 4, ", ""), "missing required key 'generation.max_new_tokens'"),
        (edited("stop: ['\\n']", "stop: ['']"), "generation.stop[0]: String should have at least 1 character"),
        (edited("scorer: last_number", "scorer: exact"), "scorer: Input should be 'last_number' or 'phrase_first_line', got 'exact'"),
        (edited("{template: 'Q: {question}'}", "'Q: {question}'"), "prompt: Input should be a valid dictionary, got 'Q: {question}'"),
        (edited("Q: {question}", "Q:"), "prompt.template has no {question} placeholder"),
        (edited("{local: x.tsv}", "{hub: {name: ja}}"), "missing required key 'splits.test.hub.path'"),
        (edited("{local: x.tsv}", "{hub: {path: a, nme: ja}}"), "splits.test.hub: unknown key(s) ['nme']"),
        (edited("{local: x.tsv}", "{disjoint_from: []}"), "splits.test needs 'local' and/or 'hub'"),
        (edited("{local: x.tsv}", "{local: x.tsv, disjoint_from: [3]}"), "splits.test.disjoint_from[0]: Input should be a valid string"),
        (edited("{test: {local: x.tsv}}", "{}"), "splits: Dictionary should have at least 1 item"),
        (VALID + "fewshot: {path: x.json, example_template: e, insert_before: '###'}\n",
         "fewshot.insert_before '###' does not occur in prompt.template"),
        (edited("max_new_tokens: 4", "max_new_tokens: '" + "x" * 500 + "'"), "generation.max_new_tokens: Input should be"),
        ("components: []\n", "components: List should have at least 1 item"),
        ("components: [{task: toy_ja_qa, metric: acc}, {task: toy_en_math, metric: f1}]\n",
         "components[1].metric: Input should be 'acc', 'acc_ja' or 'ja_rate', got 'f1'"),
        ("components: [{task: toy_ja_qa, metric: acc, weight: 2}]\n", "components[0]: unknown key(s) ['weight']"),
        ("components: [toy_ja_qa]\n", "components[0]: Input should be a valid dictionary, got 'toy_ja_qa'"),
        ("components: [{task: toy_two_skill, metric: acc}]\n", "components[0].task 'toy_two_skill' is itself a composite"),
    ],
)
def test_a_bad_task_file_is_one_line_naming_the_file_and_the_key(tmp_path, body, message):
    (tmp_path / "bad.yaml").write_text("name: bad\n" + body)
    with pytest.raises(TaskError) as error:
        load_task("bad", tasks_dir=tmp_path)
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 'bad.yaml'}: ") and message in text, text
    assert "\n" not in text and len(text) < 300 and "pydantic" not in text and "instance of" not in text, text


def test_several_problems_report_the_first_and_count_the_rest(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\n" + edited("max_new_tokens: 4", "max_new_tokens: x")
                                       .replace("scorer: last_number", "scorer: exact"))
    with pytest.raises(TaskError, match=r"bad\.yaml: scorer: .*got 'exact' \(and 1 more problem\(s\)\)$"):
        load_task("bad", tasks_dir=tmp_path)


def test_a_task_that_extends_another_is_checked_after_the_merge(tmp_path):
    (tmp_path / "child.yaml").write_text("name: child\nextends: toy_en_math\ngeneration: {max_new_tokens: 8}\n")
    child = load_task("child", tasks_dir=tmp_path)
    assert child.max_new_tokens == 8 and child.stop_strings == ("\n",) and child.build_prompt("Q?") == "Question: Q?\nAnswer:"
    (tmp_path / "typo.yaml").write_text("name: typo\nextends: toy_en_math\ngeneration: {max_new_token: 8}\n")
    with pytest.raises(TaskError, match=r"typo\.yaml: generation: unknown key\(s\) \['max_new_token'\]"):
        load_task("typo", tasks_dir=tmp_path)


def test_optional_keys_take_their_defaults(tmp_path, monkeypatch):
    """A hub entry's split defaults to the task split's own name, its fields to question/answer."""
    import datasets

    asked = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None: asked.append((path, name, split)) or [{"question": "q", "answer": "1"}])
    (tmp_path / "hubbed.yaml").write_text("name: hubbed\n" + edited("{test: {local: x.tsv}}", "{search: {hub: {path: org/data}}}"))
    task = load_task("hubbed", tasks_dir=tmp_path)
    assert task.load_split("search").examples[0].answer == "1" and asked == [("org/data", None, "search")]
    assert task.splits["search"].disjoint_from == () and task.splits["search"].local is None


def test_every_hydra_task_config_names_a_task_that_loads():
    configs = sorted((CONF_DIR / "task").glob("*.yaml"))
    assert configs
    for config in configs:
        entry = yaml.safe_load(config.read_text(encoding="utf-8"))
        if entry["name"] == HARNESS_TASK:  # lm-eval tasks: the entry's own settings, its task names set on the command
            assert config.stem == HARNESS_TASK and entry["tasks"] == "???"
            HarnessSettings.load({**entry, "tasks": ["toy_arith"]})
            continue
        task = load_task(entry["name"])
        assert task.name == config.stem and (isinstance(task, CompositeTask) or task.max_new_tokens > 0)
