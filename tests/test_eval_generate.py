"""Batched greedy generation and the Evaluator on tiny random Mistral checkpoints (behaviour, not accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.eval import Evaluator, GenerationSettings, ResultCache, encode_prompts, generate_greedy, load_task
from evomerge.eval.configured import pool_evaluator
from evomerge.eval.evaluator import generation_options
from evomerge.eval.generate import StopOnStrings, cut_at_stop
from evomerge.modelio import load_model

PROMPTS = [
    "問題：太郎はりんごを3個持っています。5個もらいました。全部で何個ですか？\n答え：",
    "Question: Tom has 12 apples.\nAnswer:",
    "質問：花子は何を持っていますか？\n答え：",
    "Q",
    "Question: Tom has 12 apples. He gets 9 more. How many apples does he have?\nAnswer:",
    "答えは8個です。",
    "質問：太郎\n答え：",
]


class RecordingModel:
    """Exposes only what the generator may use (generate + device) and records the output widths."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = model.device
        self.generation_config = model.generation_config
        self.new_token_counts: list[int] = []

    def generate(self, input_ids, **kwargs):
        output = self.model.generate(input_ids=input_ids, **kwargs)
        self.new_token_counts.append(output.shape[1] - input_ids.shape[1])
        return output


def padding_share(mask) -> float:
    return 1 - mask.float().mean().item()


def test_groups_and_batches_are_length_sorted_and_left_padded(tokenizer):
    encoded = encode_prompts(tokenizer, PROMPTS, batch_size=3, max_padding=0.99, max_decode_padding=0.99)
    lengths = [len(ids) for ids in tokenizer(PROMPTS)["input_ids"]]
    assert encoded.prefix_ids is None and encoded.count == len(PROMPTS)
    assert [len(g.positions) for g in encoded.groups] == [3, 3, 1]
    flat_order = [position for group in encoded.groups for position in group.positions]
    assert flat_order != list(range(len(PROMPTS)))  # sorting really reorders, so restoring order is tested
    assert [lengths[p] for p in flat_order] == sorted(lengths, reverse=True)
    for group in encoded.groups:
        assert group.attention_mask[:, -1].all()  # real tokens end every row: padding is on the left
        assert group.input_ids.shape[1] == max(lengths[p] for p in group.positions)
        assert [(b.rows.start, b.rows.stop) for b in group.batches] == [(0, len(group.positions))]
    longest = max(lengths)
    budgeted = encode_prompts(tokenizer, PROMPTS, batch_size=10, max_padding=0.99, max_batch_tokens=2 * longest,
                              max_decode_padding=0.99)
    assert len(budgeted.groups[0].positions) == 2  # the two longest prompts fill the token budget
    assert all(g.input_ids.numel() <= 2 * longest or len(g.positions) == 1 for g in budgeted.groups)
    assert sorted(p for g in budgeted.groups for p in g.positions) == list(range(len(PROMPTS)))
    for max_padding in (0.0, 0.3):
        encoded = encode_prompts(tokenizer, PROMPTS, batch_size=10, max_padding=max_padding, max_decode_padding=0.99)
        assert len(encoded.groups) == 1  # decoded together, read in prompt batches of nearly equal length
        (group,) = encoded.groups
        assert [b.rows.start for b in group.batches[1:]] == [b.rows.stop for b in group.batches[:-1]]
        for batch in group.batches:
            own = group.attention_mask[batch.rows][:, group.columns(batch, 0)]
            assert padding_share(own) <= max_padding and batch.width == own.shape[1]
            assert batch.width == max(lengths[p] for p in group.positions[batch.rows])
        assert len(group.batches) > 1
        for group in encode_prompts(tokenizer, PROMPTS, batch_size=10, max_decode_padding=max_padding).groups:
            assert padding_share(group.attention_mask) <= max_padding
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left-padding"):
            encode_prompts(tokenizer, PROMPTS, batch_size=3)
    finally:
        tokenizer.padding_side = "left"


def test_batched_generation_equals_one_at_a_time_and_is_deterministic(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=12, batch_size=3, max_padding=0.99)
    batched = generate_greedy(model, tokenizer, PROMPTS, settings, progress=False)
    one_at_a_time = [generate_greedy(model, tokenizer, [p], settings, progress=False)[0] for p in PROMPTS]
    assert batched == one_at_a_time
    assert generate_greedy(model, tokenizer, PROMPTS, GenerationSettings(12, batch_size=7, max_padding=0.99), progress=False) == batched
    budgeted = GenerationSettings(12, batch_size=7, max_padding=0.1, max_batch_tokens=60)
    assert generate_greedy(model, tokenizer, PROMPTS, budgeted, progress=False) == batched
    # One decode group read in many prompt batches: each batch's cache lands in the group's columns for it.
    grouped = GenerationSettings(12, batch_size=7, max_padding=0.0, max_decode_padding=0.99)
    assert generate_greedy(model, tokenizer, PROMPTS, grouped, progress=False) == batched
    assert len(set(batched)) > 1 and all(batched)  # real, differing generations rather than empty strings


def test_greedy_ignores_a_sampling_generation_config(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=8, batch_size=4)
    expected = generate_greedy(model, tokenizer, PROMPTS, settings, progress=False)
    original = model.generation_config.do_sample
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0
    try:
        torch.manual_seed(123)
        assert generate_greedy(model, tokenizer, PROMPTS, settings, progress=False) == expected
    finally:
        model.generation_config.do_sample, model.generation_config.temperature = original, 1.0


def test_stop_strings_cut_the_text_and_end_the_batch_early(model, tokenizer):
    unstopped = generate_greedy(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=24, batch_size=7), progress=False)
    stop = unstopped[0][3]  # a character the model is known to produce, early in row 0
    stopped = generate_greedy(model, tokenizer, PROMPTS, GenerationSettings(24, (stop,), batch_size=7), progress=False)
    assert stopped == [cut_at_stop(text, [stop]) for text in unstopped]
    assert stopped[0] == unstopped[0][:3]
    # Rows whose stop string comes within 20 characters (so within 20 tokens) end the batch before 24 tokens.
    hitting = [prompt for prompt, text in zip(PROMPTS, unstopped) if 0 <= text.find(stop) < 20]
    recording = RecordingModel(model)
    generate_greedy(recording, tokenizer, hitting, GenerationSettings(24, (stop,), batch_size=len(hitting), max_padding=0.99, max_decode_padding=0.99), progress=False)
    assert len(recording.new_token_counts) == 1 and recording.new_token_counts[0] <= 21


def test_stop_criterion_reads_only_generated_tokens(tokenizer):
    prompt = tokenizer(["質問：花子\n答え："], return_tensors="pt")["input_ids"]
    width = prompt.shape[1]
    criterion = StopOnStrings(tokenizer, ["\n"], prompt_width=width)
    plain = torch.cat([prompt, tokenizer(["花子"], return_tensors="pt")["input_ids"]], dim=1)
    with_newline = torch.cat([prompt, tokenizer(["花\n"], return_tensors="pt")["input_ids"]], dim=1)
    assert criterion(plain, None).tolist() == [False]  # the prompt's own newline does not count
    assert criterion(with_newline, None).tolist() == [True]


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("答えは8です。\n### 指示: 次", ["### 指示", "\n"]) == "答えは8です。"
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"


def write_toy_zoo(root: Path) -> Path:
    rows = {
        "toy_ja_qa": [("花子は青いぼうしを持っています。花子は何を持っていますか？", "青いぼうし")] * 3,
        "toy_en_math": [(f"Tom has {i} apples. He gets 2 more. How many?", str(i + 2)) for i in range(4)],
        "toy_ja_math": [(f"りんごが{i}個あります。2個もらいました。全部で何個？", str(i + 2)) for i in range(5)],
    }
    for task, task_rows in rows.items():
        for split, suffix in [("search", ""), ("test", "（テスト）")]:
            path = root / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"question": q + suffix, "answer": a}) + "\n" for q, a in task_rows))
    return root


def test_evaluator_metrics_samples_and_split(model, tokenizer, tmp_path):
    task = load_task("toy_ja_math", {"zoo_dir": str(write_toy_zoo(tmp_path))})
    result = Evaluator(task, "search", tokenizer, batch_size=2, progress=False).evaluate(model)
    assert result.split == "search" and result.metrics["split"] == "search" and result.metrics["n"] == 5
    assert set(result.metrics) == {"score", "acc", "acc_ja", "ja_rate", "n", "tokens", "split"}
    assert 0 < result.metrics["tokens"] <= result.metrics["n"] * task.max_new_tokens  # generated, up to each stop
    assert result.metrics["score"] == result.metrics["acc_ja"]
    direct = generate_greedy(model, tokenizer, task_prompts(task, "search"), GenerationSettings(40, ("\n",)), progress=False)
    assert [s["generation"] for s in result.samples] == direct
    assert [s["gold"] for s in result.samples] == ["2", "3", "4", "5", "6"]
    assert result.samples[0]["prompt"] == "問題：りんごが0個あります。2個もらいました。全部で何個？\n答え："
    assert all("\n" not in s["generation"] for s in result.samples)
    assert result.data_sources["toy_ja_math"].endswith("toy_ja_math/search.jsonl")
    test_result = Evaluator(task, "test", tokenizer, progress=False).evaluate(model)
    assert test_result.split == "test" and test_result.samples[0]["prompt"].endswith("（テスト）\n答え：")


def test_a_search_evaluator_takes_every_generation_option_of_its_task_entry(tiny_checkpoints, tmp_path):
    # The first source that sets an option wins, 0 is a value, and unset options are left to the Evaluator.
    assert generation_options({"max_padding": 0.0}, {"max_padding": 0.3, "batch_size": 8, "max_new_tokens": None}) == {
        "batch_size": 8, "max_padding": 0.0,
    }
    task = load_task("toy_en_math", {"zoo_dir": str(write_toy_zoo(tmp_path))})
    entry = {"name": "toy_en_math", "batch_size": 2, "max_padding": 0.0, "max_decode_padding": 0.05,
             "max_batch_tokens": 64, "max_new_tokens": 7}
    (prepared,) = pool_evaluator(task, entry, tiny_checkpoints["base"], "search").prepared
    assert prepared.settings == GenerationSettings(7, ("\n",), batch_size=2, max_padding=0.0, max_batch_tokens=64,
                                                   max_decode_padding=0.05)
    assert all(len(group.positions) <= 2 for group in prepared.encoded.groups)


def task_prompts(task, split):
    return [task.build_prompt(example.question) for example in task.load_split(split).examples]


def test_cache_hits_skip_generation_and_keys_separate_models_and_splits(model, tokenizer, tmp_path, monkeypatch):
    task = load_task("toy_en_math", {"zoo_dir": str(write_toy_zoo(tmp_path))})
    cache_file = tmp_path / "cache.json"
    evaluator = Evaluator(task, "search", tokenizer, cache=ResultCache(cache_file), progress=False)
    first = evaluator.evaluate(model, model_key="recipe-abc")
    assert not first.cached

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached result must not generate again")

    monkeypatch.setattr(type(model), "generate", no_generation)
    again = evaluator.evaluate(model, model_key="recipe-abc")
    assert again.cached and again.metrics == first.metrics and again.samples == first.samples
    from_file = Evaluator(task, "search", tokenizer, cache=ResultCache(cache_file), progress=False)
    assert from_file.evaluate(model, model_key="recipe-abc").metrics == first.metrics
    assert evaluator.cache_key("recipe-abc") != evaluator.cache_key("recipe-def")
    assert evaluator.cache_key("recipe-abc") != Evaluator(task, "test", tokenizer, progress=False).cache_key("recipe-abc")
    shorter = Evaluator(task, "search", tokenizer, max_new_tokens=5, progress=False)
    assert evaluator.cache_key("recipe-abc") != shorter.cache_key("recipe-abc")
    with pytest.raises(AssertionError, match="must not generate"):
        evaluator.evaluate(model, model_key="recipe-def")


def test_prompts_are_tokenized_once_for_all_candidates(tiny_checkpoints, tokenizer, tmp_path, monkeypatch):
    task = load_task("toy_ja_qa", {"zoo_dir": str(write_toy_zoo(tmp_path))})
    evaluator = Evaluator(task, "search", tokenizer, progress=False)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("prompts were tokenized again")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    for name in ("base", "expert_b"):
        assert evaluator.evaluate(load_model(tiny_checkpoints[name]), model_key=name).metrics["n"] == 3


def test_composite_evaluation_reports_components(model, tokenizer, tmp_path):
    task = load_task("toy_two_skill", {"zoo_dir": str(write_toy_zoo(tmp_path))})
    result = Evaluator(task, "test", tokenizer, progress=False).evaluate(model)
    metrics = result.metrics
    assert metrics["n"] == 3 + 4 and metrics["split"] == "test"
    assert metrics["score"] == pytest.approx((metrics["toy_ja_qa/acc_ja"] + metrics["toy_en_math/acc"]) / 2)
    assert {s["task"] for s in result.samples} == {"toy_ja_qa", "toy_en_math"}
    assert set(result.generation) == {"toy_ja_qa", "toy_en_math"}


def test_generation_logs_no_transformers_deprecation(model, tokenizer):
    """Our calls use the model's own names for the KV cache (`cache` from transformers 5.2x on): no deprecation
    message, on the prefix-sharing path (MGSM-JA's prompts share their instruction header) too."""
    import logging

    from transformers.utils import logging as transformers_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logging.warning_once.cache_clear()  # a message logged earlier in this process is not logged again
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        Evaluator(load_task("mgsm_ja", {}), "test", tokenizer, max_new_tokens=2, progress=False).evaluate(model)
    finally:
        logger.removeHandler(handler)
    assert not [record.getMessage() for record in records if "deprecated" in record.getMessage()]
