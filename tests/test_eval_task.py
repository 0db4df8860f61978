"""Task loading: the toy zoo's tasks and their data contract, the composite task, and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.eval.task import CompositeTask, Task, TaskError, available_tasks, load_task

TOY_ROWS = {
    "toy_ja_qa": [
        ("太郎は赤いかばんを持っています。花子は青いぼうしを持っています。花子は何を持っていますか？", "青いぼうし"),
        ("次郎は白いねこを見ました。次郎は何を見ましたか？", "白いねこ"),
    ],
    "toy_en_math": [("Tom has 3 apples. He gets 5 more. How many apples does he have?", "8")],
    "toy_ja_math": [("太郎はりんごを3個持っています。5個もらいました。全部で何個ですか？", "8")],
}


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in rows))


@pytest.fixture
def zoo_dir(tmp_path) -> Path:
    """A zoo data folder as the zoo builder writes it; the test split's rows differ from the search split's."""
    for task, rows in TOY_ROWS.items():
        write_jsonl(tmp_path / "data" / task / "search.jsonl", rows)
        write_jsonl(tmp_path / "data" / task / "test.jsonl", [(q + "（テスト）", a) for q, a in rows])
    return tmp_path


def test_all_shipped_tasks_load():
    assert {"mgsm_ja", "mgsm_ja_fewshot", "toy_ja_qa", "toy_en_math", "toy_ja_math", "toy_two_skill"} <= set(
        available_tasks()
    )
    for name in available_tasks():
        assert load_task(name).name == name


@pytest.mark.parametrize(
    ("name", "prompt", "metric"),
    [
        ("toy_ja_qa", "質問：Q?\n答え：", "acc_ja"),
        ("toy_en_math", "Question: Q?\nAnswer:", "acc"),
        ("toy_ja_math", "問題：Q?\n答え：", "acc_ja"),
    ],
)
def test_toy_prompts_and_generation_settings(name, prompt, metric):
    task = load_task(name)  # no zoo_dir needed just to build prompts
    assert task.build_prompt("Q?") == prompt
    assert task.primary_metric == metric and task.stop_strings == ("\n",) and task.max_new_tokens == 40


def test_prompt_braces_in_questions_are_left_alone():
    assert load_task("toy_en_math").build_prompt("{answer} {x}") == "Question: {answer} {x}\nAnswer:"


def test_splits_read_from_the_zoo_are_kept_apart(zoo_dir):
    task = load_task("toy_ja_qa", {"zoo_dir": str(zoo_dir)})
    search, test = task.load_split("search"), task.load_split("test")
    assert search.split == "search" and test.split == "test"
    assert search.source == str(zoo_dir / "data" / "toy_ja_qa" / "search.jsonl")
    assert [e.answer for e in search.examples] == ["青いぼうし", "白いねこ"]
    assert all(e.question.endswith("（テスト）") for e in test.examples)
    assert not {e.question for e in search.examples} & {e.question for e in test.examples}


@pytest.mark.parametrize(
    ("name", "generation", "gold", "expected"),
    [
        ("toy_ja_qa", "花子は青いぼうしを持っています。", "青いぼうし", {"acc": 1.0, "acc_ja": 1.0, "score": 1.0}),
        ("toy_ja_qa", "花子は赤いかばんを持っています。", "青いぼうし", {"acc": 0.0, "acc_ja": 0.0, "ja_rate": 1.0}),
        ("toy_en_math", " 3 + 5 = 8. The answer is 8.", "8", {"acc": 1.0, "acc_ja": 0.0, "ja_rate": 0.0, "score": 1.0}),
        ("toy_en_math", " 3 + 5 = 9. The answer is 9.", "8", {"acc": 0.0, "score": 0.0}),
        ("toy_ja_math", "3 + 5 = 8。答えは8個です。", "8", {"acc": 1.0, "acc_ja": 1.0, "score": 1.0}),
        ("toy_ja_math", " 3 + 5 = 8. The answer is 8.", "8", {"acc": 1.0, "acc_ja": 0.0, "score": 0.0}),
    ],
)
def test_toy_scoring(name, generation, gold, expected):
    task = load_task(name)
    metrics = task.metrics(task.score([generation], [gold]), "search")
    assert {key: metrics[key] for key in expected} == expected
    assert metrics["split"] == "search" and metrics["n"] == 1


def test_composite_scores_the_mean_and_reports_each_component():
    composite = load_task("toy_two_skill")
    assert isinstance(composite, CompositeTask)
    assert composite.objective_names == ["toy_ja_qa/acc_ja", "toy_en_math/acc"]
    qa, math = (component.task for component in composite.components)
    qa_metrics = qa.metrics(qa.score(["花子は青いぼうしを持っています。", "違います"], ["青いぼうし", "白いねこ"]), "test")
    math_metrics = math.metrics(math.score([" The answer is 8."], ["8"]), "test")
    metrics = composite.combine({"toy_ja_qa": qa_metrics, "toy_en_math": math_metrics}, "test")
    assert metrics["score"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["toy_ja_qa/acc_ja"] == 0.5 and metrics["toy_en_math/acc"] == 1.0
    assert metrics["n"] == 3 and metrics["acc"] == pytest.approx(2 / 3) and metrics["ja_rate"] == pytest.approx(2 / 3)
    assert metrics["split"] == "test"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError, match=r"unknown task 'toy_nope'.*toy_ja_qa"):
        load_task("toy_nope")


def test_unset_variable_is_named():
    with pytest.raises(TaskError, match=r"variable 'zoo_dir' is not set"):
        load_task("toy_en_math").load_split("search")


def test_unknown_split_lists_the_splits():
    with pytest.raises(TaskError, match=r"no split 'train'.*\['search', 'test'\]"):
        load_task("mgsm_ja").load_split("train")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(TaskError, match=r"data file .*data/toy_ja_math/test\.jsonl does not exist"):
        load_task("toy_ja_math", {"zoo_dir": str(tmp_path)}).load_split("test")


def test_missing_local_and_unreachable_hub_reports_both(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError, match=r"mgsm_ja\.tsv does not exist; hub dataset 'juletxara/mgsm' .*no network"):
        load_task("mgsm_ja", {"mgsm_dir": str(tmp_path)}).load_split("test")


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("toy_ja_qa", '{"question": "q", "answer": "a"}\n{"question": "q2"}\n', r"search\.jsonl line 2: expected an object"),
        ("toy_ja_qa", '{"question": "q", "answer": "a"}\nnot json\n', r"search\.jsonl line 2: not valid JSON"),
        ("toy_en_math", '{"question": "q", "answer": "eight"}\n', r"search\.jsonl line 1: gold answer 'eight' is not a number"),
        ("toy_ja_qa", "\n", r"search\.jsonl has no rows \(empty split\)"),
    ],
)
def test_malformed_rows_and_empty_splits_are_named(tmp_path, task, content, message):
    path = tmp_path / "data" / task / "search.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_task(task, {"zoo_dir": str(tmp_path)}).load_split("search")


def test_malformed_tsv_row_is_named(tmp_path):
    (tmp_path / "mgsm_ja.tsv").write_text("質問1\t18\n質問2 だけ\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"mgsm_ja\.tsv line 2: expected 'question<TAB>answer'"):
        load_task("mgsm_ja", {"mgsm_dir": str(tmp_path)}).load_split("test")


def test_task_yaml_errors_name_the_file(tmp_path):
    valid = (
        "scorer: last_number\nprompt: {template: 'Q: {question}'}\n"
        "generation: {max_new_tokens: 4, stop: []}\nsplits: {test: {local: x.tsv}}\n"
    )
    (tmp_path / "ok.yaml").write_text("name: ok\nprimary_metric: acc\n" + valid)
    assert isinstance(load_task("ok", tasks_dir=tmp_path), Task)
    (tmp_path / "typo.yaml").write_text("name: typo\nprimary_metric: acc\nsplit: oops\n" + valid)
    with pytest.raises(TaskError, match=r"typo\.yaml: unknown key\(s\) \['split'\]"):
        load_task("typo", tasks_dir=tmp_path)
    (tmp_path / "metric.yaml").write_text("name: metric\nprimary_metric: f1\n" + valid)
    with pytest.raises(TaskError, match=r"metric\.yaml: primary_metric: Input should be 'acc', 'acc_ja' or 'ja_rate', got 'f1'"):
        load_task("metric", tasks_dir=tmp_path)
    (tmp_path / "short.yaml").write_text("name: short\nscorer: last_number\n")
    with pytest.raises(TaskError, match=r"short\.yaml: missing required key 'prompt'"):
        load_task("short", tasks_dir=tmp_path)


# --- MGSM-JA's search split: a local file, else EvoLLM's search set on the hub; never overlapping the test rows ---

MGSM_SEARCH_HUB = ("SakanaAI/gsm8k-ja-test_250-1319", None, "test")  # dataset id, config, split (task settings)
SEARCH_ROWS = [("りんごが3個あります。2個もらいました。全部で何個ですか？", "5"),
               ("えんぴつが10本あります。4本あげました。残りは何本ですか？", "6")]


class FakeHubDataset(list):
    """What datasets.load_dataset returns, as far as the task reads it: rows and their column names."""

    def __init__(self, rows, columns):
        super().__init__(rows)
        self.column_names = columns


def no_network(monkeypatch):
    """Offline as HF_HUB_OFFLINE=1 makes it, with datasets.load_dataset failing as it does then."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(path, name=None, split=None):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def mgsm_test_questions() -> list[str]:
    return [example.question for example in load_task("mgsm_ja").load_split("test").examples]


def test_mgsm_search_split_reads_a_local_file(tmp_path, monkeypatch):
    no_network(monkeypatch)
    write_jsonl(tmp_path / "search.jsonl", SEARCH_ROWS)
    (tmp_path / "search.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in SEARCH_ROWS), encoding="utf-8")
    for name in ("search.jsonl", "search.tsv"):
        for task_name in ("mgsm_ja", "mgsm_ja_fewshot"):  # the few-shot task inherits the split
            data = load_task(task_name, {"mgsm_search_file": str(tmp_path / name)}).load_split("search")
            assert data.source == str(tmp_path / name) and [(e.question, e.answer) for e in data.examples] == SEARCH_ROWS


def test_mgsm_search_split_offline_without_a_file_says_how_to_provide_one(monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(TaskError) as error:
        load_task("mgsm_ja").load_split("search")
    message = str(error.value)
    assert "\n" not in message
    assert "no data for task 'mgsm_ja' split 'search'" in message
    assert "no local file given (set mgsm_search_file=<a .jsonl or .tsv file" in message
    assert ("hub dataset 'SakanaAI/gsm8k-ja-test_250-1319' is not in the datasets cache and the hub is offline "
            "(HF_HUB_OFFLINE=1)") in message
    with pytest.raises(TaskError, match=r"data file .*nowhere\.jsonl does not exist; hub dataset"):
        load_task("mgsm_ja", {"mgsm_search_file": str(Path("/nowhere.jsonl"))}).load_split("search")


def test_mgsm_search_split_from_the_hub_uses_the_task_settings(monkeypatch):
    import datasets

    asked = []

    def hub(path, name=None, split=None):
        asked.append((path, name, split))
        return FakeHubDataset([{"question": q, "answer": f"... #### {a}", "answer_number": int(a)} for q, a in SEARCH_ROWS],
                              ["question", "answer", "answer_number"])

    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = load_task("mgsm_ja").load_split("search")
    assert asked == [MGSM_SEARCH_HUB] and data.source == "hub:SakanaAI/gsm8k-ja-test_250-1319"
    assert [(e.question, e.answer) for e in data.examples] == SEARCH_ROWS


def test_hub_fields_that_the_dataset_lacks_are_named(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None: FakeHubDataset([{"question": "q", "answer": "1"}],
                                                                           ["question", "answer"]))
    with pytest.raises(TaskError, match=r"has no field 'answer_number'; its fields are \['question', 'answer'\]"):
        load_task("mgsm_ja").load_split("search")


def test_a_search_file_sharing_a_question_with_the_test_rows_is_refused(tmp_path):
    """Overlap is found after NFKC and whitespace normalisation (full-width digits, a trailing space)."""
    import unicodedata

    test_question = mgsm_test_questions()[7]
    disguised = test_question.translate(str.maketrans("0123456789", "０１２３４５６７８９")) + " "
    assert disguised != test_question
    assert unicodedata.normalize("NFKC", disguised).strip() == unicodedata.normalize("NFKC", test_question)
    write_jsonl(tmp_path / "search.jsonl", [*SEARCH_ROWS, (disguised, "1")])
    with pytest.raises(TaskError) as error:
        load_task("mgsm_ja", {"mgsm_search_file": str(tmp_path / "search.jsonl")}).load_split("search")
    message = str(error.value)
    assert "\n" not in message
    assert f"split 'search' ({tmp_path / 'search.jsonl'}) shares 1 question(s) with split 'test'" in message
    assert "the first at row 3" in message and "must not overlap" in message


def test_a_hub_search_set_sharing_a_test_question_is_refused_too(monkeypatch):
    import datasets

    rows = [{"question": q, "answer_number": a} for q, a in [*SEARCH_ROWS, (mgsm_test_questions()[0], "18")]]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None: FakeHubDataset(rows, ["question", "answer_number"]))
    with pytest.raises(TaskError, match=r"split 'search' \(hub:SakanaAI/gsm8k-ja-test_250-1319\) shares 1 question"):
        load_task("mgsm_ja").load_split("search")


def test_the_test_split_is_read_without_the_search_split(monkeypatch):
    no_network(monkeypatch)  # the search set is unreachable: the test split does not need it
    assert len(load_task("mgsm_ja").load_split("test").examples) == 250


def test_disjoint_from_must_name_another_split(tmp_path):
    base = ("name: {name}\nscorer: last_number\nprimary_metric: acc\nprompt: {{template: 'Q: {{question}}'}}\n"
            "generation: {{max_new_tokens: 4}}\nsplits: {{search: {{local: s.tsv, disjoint_from: {other}}}, "
            "test: {{local: t.tsv}}}}\n")
    for name, other in [("typo", "[tset]"), ("itself", "search")]:
        (tmp_path / f"{name}.yaml").write_text(base.format(name=name, other=other))
        with pytest.raises(TaskError, match=rf"{name}\.yaml: splits\.search\.disjoint_from names '\w+', not another split"):
            load_task(name, tasks_dir=tmp_path)
    (tmp_path / "ok.yaml").write_text(base.format(name="ok", other="test"))
    assert load_task("ok", tasks_dir=tmp_path).splits["search"].disjoint_from == ("test",)
