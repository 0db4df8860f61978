"""Batched greedy decoding on top of HF `generate`: left padding, length-sorted batches, stop strings.

HF `generate` with a KV cache is already fast (a hand-written greedy loop measured 0.8x of it), so this
module only arranges the work around it: prompts are tokenized once and grouped by length so batches
carry little padding, each batch stops as soon as every row has produced a stop string or EOS, and the
results come back in the caller's order. Anything with the HF causal-LM `generate` surface works, the
layer-path (DFS) models included.

Prompts built from one template share a long token prefix (MGSM-JA's instruction header). When they do,
each row is laid out as prefix + padding + own suffix: the model reads the prefix once per call (its KV
cache, from the model's own forward, is copied into every batch) and each batch reads only the suffixes.
The pads sit in the middle, masked out; HF derives position ids from the attention mask, so every real
token keeps the position it has in its unpadded prompt and generations equal one-at-a-time decoding.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import Cache


# Each extra batch costs a full run of decoding steps, so length-sorted batches split only where padding
# would exceed this share of a batch's prompt tokens: uniform prompts stay in one batch (as fast as HF on
# one batch) and MGSM-JA's uneven ones split into a few. On the 1M-parameter toy Mistral with 200 MGSM-JA
# prompts (scripts/bench_eval.py), 0.1 beat 0.2-0.4 (3.0 s against 3.3-4.3 s; one padded batch: 7.8 s).
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_PADDING = 0.1
# A common token prefix shorter than this is read with each row as before: its cache copy per batch and the
# extra forward are not worth it. With bench_eval's BPE, MGSM-JA prompts share 75 tokens (the instruction
# header) and its toy prompts 18 ("Question: Tom has "), which sharing still made no slower (1 thread, CPU time).
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE  # most rows per batch (the memory knob)
    max_padding: float = DEFAULT_MAX_PADDING  # most padding share of a batch's prompt tokens
    max_batch_tokens: int | None = None  # optional cap on rows x padded prompt width (memory, long prompts)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.max_batch_tokens or 1) < 1:
            raise ValueError(f"max_new_tokens, batch_size and max_batch_tokens must be positive, got {self}")
        if not 0 <= self.max_padding < 1:
            raise ValueError(f"max_padding must be in [0, 1), got {self.max_padding}")

    def result_defining(self) -> dict[str, object]:
        """The settings that change generations (batching does not: batched equals one-at-a-time)."""
        return {"decoding": "greedy", "max_new_tokens": self.max_new_tokens, "stop_strings": list(self.stop_strings)}


@dataclass(frozen=True)
class PromptBatch:
    positions: tuple[int, ...]  # where each row sits in the caller's prompt list
    input_ids: torch.Tensor  # shared prefix (if any) + left padding + suffix, as wide as the longest row
    attention_mask: torch.Tensor  # 0 on the pads


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts tokenized once and grouped into length-sorted padded batches, reused for every model.

    `prefix_ids` ([1, P]) is the token prefix every prompt starts with, when it is long enough to share:
    each batch's rows then start with it (followed by their pads), and a model's prefix cache stands in
    for those first P columns."""

    batches: tuple[PromptBatch, ...]
    count: int
    prefix_ids: torch.Tensor | None = None


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, kept below the shortest row so every row has a suffix to read."""
    if not token_ids:
        return 0
    first, shortest = token_ids[0], min(len(ids) for ids in token_ids)
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in token_ids):
        length += 1
    return length


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_padding: float = DEFAULT_MAX_PADDING,
    max_batch_tokens: int | None = None,
    min_shared_prefix: int | None = MIN_SHARED_PREFIX,
) -> EncodedPrompts:
    """Tokenize once, sort by length (longest first, so memory problems show at once), pad each batch left.

    A batch grows while it has at most `batch_size` rows, padding is at most `max_padding` of its
    prompt tokens, and (if set) rows x width stays within `max_batch_tokens`. A common token prefix of
    at least `min_shared_prefix` tokens (None: never) is split off to be read once per model; padding
    then goes between it and each row's suffix, and `max_padding` counts against the suffix tokens.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (load it with evomerge.modelio.load_tokenizer)")
    full_ids = tokenizer(list(prompts))["input_ids"]
    shared = common_prefix_length(full_ids)
    if min_shared_prefix is None or shared < min_shared_prefix or len(full_ids) < 2:
        shared = 0  # (a lone prompt has nobody to share its prefix with)
    prefix = full_ids[0][:shared] if full_ids else []
    token_ids = [ids[shared:] for ids in full_ids]
    order = sorted(range(len(token_ids)), key=lambda index: -len(token_ids[index]))
    batches = []
    start = 0
    while start < len(order):
        width = len(token_ids[order[start]])  # the batch's longest row: the order is descending
        end, real_tokens = start + 1, width
        while end < len(order) and end - start < batch_size:
            rows, candidate_tokens = end - start + 1, real_tokens + len(token_ids[order[end]])
            if 1 - candidate_tokens / (rows * width) > max_padding:
                break
            if max_batch_tokens is not None and rows * (shared + width) > max_batch_tokens:
                break
            end, real_tokens = end + 1, candidate_tokens
        positions = order[start:end]
        padded = tokenizer.pad({"input_ids": [token_ids[i] for i in positions]}, padding=True, return_tensors="pt")
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        if shared:
            rows = len(positions)
            prefix_columns = torch.tensor(prefix, dtype=input_ids.dtype).expand(rows, shared)
            input_ids = torch.cat([prefix_columns, input_ids], dim=1)
            attention_mask = torch.cat([torch.ones(rows, shared, dtype=attention_mask.dtype), attention_mask], dim=1)
        batches.append(PromptBatch(tuple(positions), input_ids, attention_mask))
        start = end
    prefix_ids = torch.tensor([prefix], dtype=torch.long) if shared else None
    return EncodedPrompts(tuple(batches), len(token_ids), prefix_ids)


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated tail contains a stop string; HF stops the batch when all are done.

    Only the last few tokens are decoded each step: a stop string of b UTF-8 bytes spans at most b tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_width = prompt_width
        self.window = max(len(stop.encode("utf-8")) for stop in self.stop_strings) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stop_strings) for text in texts], device=input_ids.device)


class RaiseOnNonFiniteLogits(LogitsProcessor):
    """Fails the generation at the first step whose logits hold NaN or inf (a broken merge), rather than
    letting greedy argmax turn them into a plausible-looking token stream. One sum per step (NaN and inf
    survive a sum); only a non-finite sum, which finite logits reach only past 1e38, is looked at closely."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not torch.isfinite(scores.sum()):
            bad_rows = int((~torch.isfinite(scores)).any(dim=-1).sum())
            if bad_rows == 0:  # finite logits whose sum overflowed
                return scores
            raise FloatingPointError(
                f"the model produced non-finite logits (NaN or inf) in {bad_rows} of {scores.shape[0]} rows at "
                f"generation step {input_ids.shape[1]}: its weights or activations overflowed"
            )
        return scores


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string (the stop string itself is dropped)."""
    cut = min((index for index in (text.find(stop) for stop in stop_strings) if index >= 0), default=len(text))
    return text[:cut]


def greedy_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding whatever the checkpoint's own generation_config asks for (sampling, penalties)."""
    model_config = getattr(model, "generation_config", None)
    eos_token_id = getattr(model_config, "eos_token_id", None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
    )


def prefix_cache(model: torch.nn.Module, prefix_ids: torch.Tensor) -> Cache | None:
    """The KV cache of the shared prefix, from the model's own forward (whatever its layer count or cache
    layout: a layer-path model has one cache slot per hop). None where the model gives no usable cache;
    the rows still hold the prefix then, so generation reads it with them."""
    if not callable(model):
        return None
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the prefix's logits are never used
    outputs = model(input_ids=prefix_ids, use_cache=True, **kwargs)
    cache = getattr(outputs, "past_key_values", None)
    if not isinstance(cache, Cache) or cache.get_seq_length() != prefix_ids.shape[1]:
        return None
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() and keys.shape[-2] != prefix_ids.shape[1]:
            return None  # a layer that already dropped some of the prefix (sliding window): not reusable
    return cache


def batch_cache(cache: Cache, rows: int, width: int, max_new_tokens: int) -> Cache | None:
    """A fresh copy of the prefix cache for a batch of `rows` (generate extends the cache it is given).

    None where a sliding-window layer would slide during this batch: its window counts cache slots, and
    the pads in the middle of the rows would then take the place of real tokens."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_sliding", False) and width + max_new_tokens >= getattr(layer, "sliding_window", 0):
            return None
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


@torch.inference_mode()
def generate_encoded(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: EncodedPrompts,
    settings: GenerationSettings,
    progress: bool = True,
    description: str = "generate",
    share_prefix: bool = True,
) -> list[str]:
    """Greedy generations for pre-encoded prompts, in the caller's original order, cut at the stop strings.

    Raises FloatingPointError if a step's logits are not finite. With a shared prefix, the model reads it
    once here (`share_prefix=False` makes every batch read it again: same generations, for testing)."""
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no HF-style generate(); wrap it as a GenerationMixin model")
    device = getattr(model, "device", torch.device("cpu"))
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    shared = None
    if share_prefix and encoded.prefix_ids is not None:
        shared = prefix_cache(model, encoded.prefix_ids.to(device))
    generations: list[str] = [""] * encoded.count
    with tqdm(total=encoded.count, desc=description, unit="prompt", disable=not progress, leave=False) as bar:
        for batch in encoded.batches:
            rows, prompt_width = batch.input_ids.shape
            stopping = StoppingCriteriaList()
            if settings.stop_strings:
                stopping.append(StopOnStrings(tokenizer, settings.stop_strings, prompt_width))
            extra = {}
            cache = batch_cache(shared, rows, prompt_width, settings.max_new_tokens) if shared is not None else None
            if cache is not None:
                extra["past_key_values"] = cache
            output = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stopping,
                logits_processor=LogitsProcessorList([RaiseOnNonFiniteLogits()]),
                **extra,
            )
            texts = tokenizer.batch_decode(output[:, prompt_width:], skip_special_tokens=True)
            for position, text in zip(batch.positions, texts):
                generations[position] = cut_at_stop(text, settings.stop_strings)
            bar.update(len(batch.positions))
    return generations


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    progress: bool = True,
) -> list[str]:
    """Greedy generations for raw prompts (tokenizes them; an Evaluator encodes once and reuses instead)."""
    encoded = encode_prompts(tokenizer, prompts, settings.batch_size, settings.max_padding, settings.max_batch_tokens)
    return generate_encoded(model, tokenizer, encoded, settings, progress)
