"""Shared-prefix generation (the prompt header read once per model) and the non-finite logits guard."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralForCausalLM

from evomerge.eval import Evaluator, GenerationSettings, encode_prompts, generate_greedy, load_task
from evomerge.eval.generate import (
    RaiseOnNonFiniteLogits,
    common_prefix_length,
    cut_at_stop,
    generate_encoded,
    greedy_config,
    prefix_cache,
    static_cache,
)
from evomerge.modelio import load_model
from evomerge.pathmodel import build_path_model

from conftest import tiny_config

HEADER = "以下に、あるタスクを説明する指示があります。一歩一歩考えましょう。\n\n### 指示:\n"
QUESTIONS = [
    "太郎はりんごを3個持っています。5個もらいました。全部で何個ですか？",
    "花子は何を持っていますか？",
    "Tom has 12 apples. He gets 9 more. How many apples does he have?",
    "8",
    "太郎",
    "Question: Tom has 12 apples.",
    "答えは8個です。答えは8個です。答えは8個です。",
]
# Uneven suffixes, one prompt that is exactly the header (so the shared prefix must stop one token short).
PROMPTS = [HEADER + question + "\n\n### 応答:\n" for question in QUESTIONS] + [HEADER]


class TokenCounter:
    """Counts the tokens a model's embedding reads per forward call (prefill reads show as wide calls)."""

    def __init__(self, model) -> None:
        self.widths: list[tuple[int, int]] = []
        self.handle = model.get_input_embeddings().register_forward_hook(self.record)

    def record(self, module, inputs, output) -> None:
        self.widths.append(tuple(inputs[0].shape))

    def prompt_reads(self) -> list[tuple[int, int]]:
        return [shape for shape in self.widths if shape[1] > 1]

    def close(self) -> None:
        self.handle.remove()


def one_at_a_time(model, tokenizer, prompts, settings):
    """The reference: each prompt alone, unpadded, through plain HF generate."""
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer([prompt], return_tensors="pt")
            output = model.generate(**inputs, generation_config=config)
            text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            texts.append(cut_at_stop(text, settings.stop_strings))
    return texts


def test_common_prefix_is_found_and_stops_short_of_the_shortest_prompt(tokenizer):
    full = tokenizer(PROMPTS)["input_ids"]
    header = tokenizer([HEADER])["input_ids"][0]
    shared = common_prefix_length(full)
    assert shared == len(header) - 1  # the header-only prompt keeps one token to read with its row
    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix_length([[5, 6, 7]]) == 2 and common_prefix_length([]) == 0

    encoded = encode_prompts(tokenizer, PROMPTS, batch_size=3, max_padding=0.99, max_decode_padding=0.99)
    assert encoded.prefix_ids.tolist() == [header[:shared]] and encoded.prefix_length == shared
    assert sorted(p for g in encoded.groups for p in g.positions) == list(range(len(PROMPTS)))
    for group in encoded.groups:
        assert (group.input_ids[:, :shared] == encoded.prefix_ids).all() and group.attention_mask[:, :shared].all()
        assert group.attention_mask[:, -1].all()  # every row ends with its own last real token
        for row, position in enumerate(group.positions):
            mask = group.attention_mask[row].bool()
            assert group.input_ids[row][mask].tolist() == full[position]  # prefix + suffix = the prompt's tokens
            pads = (~mask).nonzero().flatten()
            assert all(shared <= index < len(mask) - (len(full[position]) - shared) for index in pads.tolist())
    # Prompt-batch padding is measured on the suffixes: with 0% allowed, each batch's own columns are all real.
    (group,) = encode_prompts(tokenizer, PROMPTS, batch_size=10, max_padding=0.0, max_decode_padding=0.99).groups
    assert len(group.batches) > 1
    for batch in group.batches:
        own = group.attention_mask[batch.rows][:, group.columns(batch, shared)]
        assert own.all() and (group.input_ids[batch.rows][:, :shared] == encoded.prefix_ids).all()


def test_short_or_absent_prefixes_use_plain_left_padding(tokenizer):
    toy = [f"Question: Tom has {i} apples.\nAnswer:" for i in range(5)]
    assert encode_prompts(tokenizer, toy).prefix_ids is None  # a few shared tokens are not worth a cache
    assert encode_prompts(tokenizer, PROMPTS, min_shared_prefix=None).prefix_ids is None
    assert encode_prompts(tokenizer, PROMPTS[:1]).prefix_ids is None  # nothing to share with
    shared = common_prefix_length(tokenizer(PROMPTS)["input_ids"])
    assert encode_prompts(tokenizer, PROMPTS, min_shared_prefix=shared + 1).prefix_ids is None
    assert encode_prompts(tokenizer, PROMPTS, min_shared_prefix=shared).prefix_ids.shape == (1, shared)


@pytest.fixture(scope="module")
def expected_12(model, tokenizer):
    """The reference for 12 new tokens (batching settings do not change it)."""
    expected = one_at_a_time(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12))
    assert len(set(expected)) > 1 and all(expected)  # real, differing generations
    return expected


@pytest.mark.parametrize(("batch_size", "max_padding"), [(1, 0.99), (3, 0.99), (8, 0.99), (8, 0.0)])
def test_shared_prefix_generations_equal_one_at_a_time(model, tokenizer, expected_12, batch_size, max_padding):
    settings = GenerationSettings(max_new_tokens=12, batch_size=batch_size, max_padding=max_padding)
    expected = expected_12
    encoded = encode_prompts(tokenizer, PROMPTS, batch_size, max_padding, max_decode_padding=0.99)
    assert encoded.prefix_ids is not None and len(encoded.groups) == -(-len(PROMPTS) // batch_size)
    counter = TokenCounter(model)
    try:
        shared = generate_encoded(model, tokenizer, encoded, settings, progress=False)
        reads = counter.prompt_reads()
        counter.widths.clear()
        unshared = generate_encoded(model, tokenizer, encoded, settings, progress=False, share_prefix=False)
        unshared_reads = counter.prompt_reads()
    finally:
        counter.close()
    assert shared == unshared == expected
    prefix = encoded.prefix_length
    batches = [batch for group in encoded.groups for batch in group.batches]
    # The prefix is read once, then each prompt batch reads only its suffix columns but the last (which the
    # decoding of its group reads, one column per step).
    assert reads[0] == (1, prefix)
    rows = [batch.rows.stop - batch.rows.start for batch in batches]
    assert reads[1:] == [(n, b.width - 1 - prefix) for n, b in zip(rows, batches) if b.width - 1 - prefix > 1]
    assert unshared_reads == [(n, b.width - 1) for n, b in zip(rows, batches)]
    plain = encode_prompts(tokenizer, PROMPTS, batch_size, 0.99, min_shared_prefix=None)
    assert generate_encoded(model, tokenizer, plain, settings, progress=False) == expected


def test_shared_prefix_with_stop_strings_and_a_token_budget(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=20, batch_size=4, max_padding=0.2)
    unstopped = one_at_a_time(model, tokenizer, PROMPTS, settings)
    stop = unstopped[0][2]
    stopped = GenerationSettings(20, (stop,), batch_size=4, max_padding=0.2, max_batch_tokens=200)
    encoded = encode_prompts(tokenizer, PROMPTS, 4, 0.2, max_batch_tokens=200)
    assert encoded.prefix_ids is not None
    assert all(g.input_ids.numel() <= 200 or len(g.positions) == 1 for g in encoded.groups)  # counts the prefix too
    assert generate_encoded(model, tokenizer, encoded, stopped, progress=False) == [cut_at_stop(t, [stop]) for t in unstopped]


def test_a_model_without_a_usable_cache_still_generates_the_same(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=8, batch_size=3, max_padding=0.99)
    encoded = encode_prompts(tokenizer, PROMPTS, 3, 0.99)

    class GenerateOnly:  # not callable: the generator cannot run a prefix forward, so rows read the prefix
        def __init__(self, inner) -> None:
            self.device, self.generation_config, self.generate = inner.device, inner.generation_config, inner.generate

    assert prefix_cache(GenerateOnly(model), encoded.prefix_ids) is None
    assert generate_encoded(GenerateOnly(model), tokenizer, encoded, settings, progress=False) == one_at_a_time(
        model, tokenizer, PROMPTS, settings
    )


def test_the_prefix_cache_is_copied_per_batch_and_no_cache_is_made_where_a_window_would_slide(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    config.sliding_window = 64
    windowed = MistralForCausalLM(config).eval()
    encoded = encode_prompts(tokenizer, PROMPTS, 3, 0.99)
    prefix = encoded.prefix_ids.shape[1]
    with torch.inference_mode():
        cache = prefix_cache(windowed, encoded.prefix_ids)
    assert cache is not None and cache.get_seq_length() == prefix < 64
    copied = static_cache(windowed, prefix + 5 + 4, cache, rows=3)
    assert copied is not None and copied.layers[0].keys.shape[0] == 3 and cache.layers[0].keys.shape[0] == 1
    assert copied.get_seq_length() == prefix
    assert static_cache(windowed, prefix + 5 + 64, cache, rows=3) is None  # the window would slide
    settings = GenerationSettings(max_new_tokens=6, batch_size=3, max_padding=0.99)
    short = [p for p in PROMPTS if len(tokenizer(p)["input_ids"]) + 6 < 64]
    assert generate_greedy(windowed, tokenizer, short, settings, progress=False) == one_at_a_time(windowed, tokenizer, short, settings)


def test_layer_path_models_share_the_prefix_too(tiny_checkpoints, tokenizer):
    from evomerge.recipe import Hop

    sources = [load_model(tiny_checkpoints["base"]), load_model(tiny_checkpoints["expert_b"])]
    hops = [Hop(model=0, layer=0, scale=1.0), Hop(model=1, layer=1, scale=0.9), Hop(model=0, layer=1, scale=1.0),
            Hop(model=1, layer=1, scale=1.1)]  # a block that runs twice keeps two cache slots
    path = build_path_model(hops, sources)
    settings = GenerationSettings(max_new_tokens=10, batch_size=3, max_padding=0.99)
    encoded = encode_prompts(tokenizer, PROMPTS, 3, 0.99)
    with torch.inference_mode():
        cache = prefix_cache(path, encoded.prefix_ids)
    assert cache is not None and len(cache.layers) == len(hops)
    assert generate_encoded(path, tokenizer, encoded, settings, progress=False) == one_at_a_time(path, tokenizer, PROMPTS, settings)


def test_evaluator_on_mgsm_ja_shares_the_instruction_header(model, tokenizer, monkeypatch):
    task = load_task("mgsm_ja")  # the MGSM data shipped with evomerge
    evaluator = Evaluator(task, "test", tokenizer, max_new_tokens=6, progress=False)
    prepared = evaluator.prepared[0]
    assert prepared.encoded.prefix_ids is not None and prepared.encoded.prefix_ids.shape[1] >= 40
    subset = list(range(0, 250, 25))
    prompts = [prepared.prompts[i] for i in subset]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("prompts or their prefix were tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", no_tokenizing)
        result = evaluator.evaluate(model)
    expected = one_at_a_time(model, tokenizer, prompts, prepared.settings)
    assert [result.samples[i]["generation"] for i in subset] == expected


def nan_model(tiny_checkpoints):
    broken = load_model(tiny_checkpoints["base"])
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    return broken


def test_non_finite_logits_fail_the_generation(tiny_checkpoints, tokenizer):
    settings = GenerationSettings(max_new_tokens=4, batch_size=4)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate_greedy(nan_model(tiny_checkpoints), tokenizer, PROMPTS, settings, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate_greedy(nan_model(tiny_checkpoints), tokenizer, ["Q"], settings, progress=False)
    broken = load_model(tiny_checkpoints["base"])
    with torch.no_grad():
        broken.lm_head.weight[5, 0] = float("inf")  # inf times a hidden state: +-inf or NaN in one logit column
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate_greedy(broken, tokenizer, ["Q", "答え"], settings, progress=False)


def test_the_guard_passes_finite_logits_whose_sum_overflows():
    guard = RaiseOnNonFiniteLogits()
    huge = torch.full((2, 8), 3e38)
    assert not torch.isfinite(huge.sum())  # the fast check trips, the exact one must clear it
    assert guard(torch.zeros(2, 3, dtype=torch.long), huge) is huge
    broken = huge.clone()
    broken[1, 4] = float("-inf")
    with pytest.raises(FloatingPointError, match="in 1 of 2 rows at generation step 3"):
        guard(torch.zeros(2, 3, dtype=torch.long), broken)
