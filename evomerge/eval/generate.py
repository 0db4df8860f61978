"""Batched greedy decoding on top of HF `generate`: length-sorted batches, a prefilled cache, stop strings.

HF `generate` with a KV cache is already fast (a hand-written greedy loop measured 0.8x of it), so this
module arranges the work around it. Prompts are tokenized once and sorted by length. Padding costs
differ by phase: a pad in a prompt batch costs a full forward of compute, a pad in the cache during
decoding only a masked slot, while every separate decode costs a full run of steps. So rows are
decoded in large *groups* and each group's prompts are read (prefilled) in smaller *batches* of nearly
equal length; every batch's keys and values are written into the group's preallocated cache (HF's
static cache), each row's last prompt token left for `generate` to read. Each group stops as soon as
every row has produced a stop string or EOS, and the results come back in the caller's order.

Prompts built from one template share a long token prefix (MGSM-JA's instruction header). When they do,
each row is laid out as prefix + padding + own suffix and the model reads the prefix once per call
(its cache, from the model's own forward, is copied into every batch). The pads sit in the middle,
masked out, and position ids come from the attention mask, so every real token keeps the position it
has in its unpadded prompt and generations equal one-at-a-time decoding. Anything with the HF
causal-LM surface works, the layer-path (DFS) models included; a model without an HF config is given
no cache and `generate` reads the rows itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise
from typing import Any

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
from transformers.cache_utils import Cache, StaticCache

from evomerge.errors import TaskError

# A prompt batch grows while its padding is at most this share of its prompt tokens (after the shared
# prefix): pads there cost a full forward. A decode group grows while its padding is at most
# DEFAULT_MAX_DECODE_PADDING of its prompt slots (prefix included): pads there cost only a masked cache
# slot per step, and each extra group costs a full run of decoding steps. On the 1M-parameter toy Mistral
# with 200 MGSM-JA prompts (scripts/bench_eval.py, best of 4), decode padding 0.2 (3 groups) took 1.97 s
# against 2.16-2.29 s for 0.1, 0.3 and 0.5; prompt padding 0.02-0.15 differed by no more than the noise.
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_PADDING = 0.1
DEFAULT_MAX_DECODE_PADDING = 0.2
# A common token prefix shorter than this is read with each row as before: its cache copy per batch and the
# extra forward are not worth it. With bench_eval's BPE, MGSM-JA prompts share 75 tokens (the instruction
# header) and its toy prompts 18 ("Question: Tom has "), which sharing still made no slower (1 thread, CPU time).
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE  # most rows decoded together (the memory knob)
    max_padding: float = DEFAULT_MAX_PADDING  # most padding share of a prompt batch's tokens
    max_batch_tokens: int | None = None  # optional cap on rows x padded prompt width (memory, long prompts)
    max_decode_padding: float = DEFAULT_MAX_DECODE_PADDING  # most padding share of a decode group's prompt slots

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.max_batch_tokens or 1) < 1:
            raise TaskError(f"max_new_tokens, batch_size and max_batch_tokens must be positive, got {self}")
        if not (0 <= self.max_padding < 1 and 0 <= self.max_decode_padding < 1):
            raise TaskError(f"max_padding and max_decode_padding must be in [0, 1), got {self}")

    def result_defining(self) -> dict[str, object]:
        """The settings that change generations (batching does not: batched equals one-at-a-time)."""
        return {"decoding": "greedy", "max_new_tokens": self.max_new_tokens, "stop_strings": list(self.stop_strings)}


@dataclass(frozen=True)
class PromptBatch:
    """Rows of a decode group whose prompts are read in one forward, at their own width (the group's
    columns `DecodeGroup.columns(batch, prefix)`)."""

    rows: slice  # of the group
    width: int  # the longest row's tokens, the shared prefix included


@dataclass(frozen=True)
class DecodeGroup:
    """Rows decoded together, longest first, laid out as shared prefix + left padding + suffix."""

    positions: tuple[int, ...]  # where each row sits in the caller's prompt list
    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # 0 on the pads
    batches: tuple[PromptBatch, ...]

    def columns(self, batch: PromptBatch, prefix: int) -> torch.Tensor:
        """The group columns that make up `batch`'s own layout: the prefix, then its last width - prefix."""
        width = self.input_ids.shape[1]
        return torch.cat([torch.arange(prefix), torch.arange(width - batch.width + prefix, width)])


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts tokenized once and grouped by length, reused for every model.

    `prefix_ids` ([1, P]) is the token prefix every prompt starts with, when it is long enough to share:
    each row then starts with it (followed by its pads), and a model's prefix cache stands in for those
    first P columns."""

    groups: tuple[DecodeGroup, ...]
    count: int
    prefix_ids: torch.Tensor | None = None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_ids is None else self.prefix_ids.shape[1]


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, kept below the shortest row so every row has a suffix to read."""
    if not token_ids:
        return 0
    first, shortest = token_ids[0], min(len(ids) for ids in token_ids)
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in token_ids):
        length += 1
    return length


def length_runs(lengths: Sequence[int], max_padding: float, batch_size: int, max_tokens: int | None, extra: int) -> list[int]:
    """Sizes of consecutive runs of `lengths` (sorted longest first): a run grows while it has at most
    `batch_size` rows, padding is at most `max_padding` of its tokens, and (if set) rows x (extra + width)
    stays within `max_tokens`."""
    sizes, start = [], 0
    while start < len(lengths):
        width = lengths[start]
        end, real_tokens = start + 1, width
        while end < len(lengths) and end - start < batch_size:
            rows, candidate_tokens = end - start + 1, real_tokens + lengths[end]
            if 1 - candidate_tokens / (rows * width) > max_padding:
                break
            if max_tokens is not None and rows * (extra + width) > max_tokens:
                break
            end, real_tokens = end + 1, candidate_tokens
        sizes.append(end - start)
        start = end
    return sizes


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_padding: float = DEFAULT_MAX_PADDING,
    max_batch_tokens: int | None = None,
    min_shared_prefix: int | None = MIN_SHARED_PREFIX,
    max_decode_padding: float = DEFAULT_MAX_DECODE_PADDING,
) -> EncodedPrompts:
    """Tokenize once, sort by length (longest first, so memory problems show at once), then cut the rows
    into decode groups and each group into prompt batches (see `length_runs`).

    A group has at most `batch_size` rows, padding at most `max_decode_padding` of its prompt slots and
    (if set) rows x width within `max_batch_tokens`; its prompt batches have padding at most
    `max_padding` of their tokens after the shared prefix. A common token prefix of at least
    `min_shared_prefix` tokens (None: never) is split off to be read once per model; padding then goes
    between it and each row's suffix.
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
    suffix_lengths = [len(token_ids[index]) for index in order]
    groups, start = [], 0
    for group_rows in length_runs([shared + n for n in suffix_lengths], max_decode_padding, batch_size, max_batch_tokens, 0):
        positions = order[start : start + group_rows]
        sizes = length_runs(suffix_lengths[start : start + group_rows], max_padding, batch_size, max_batch_tokens, shared)
        batches = tuple(
            PromptBatch(slice(first, last), shared + suffix_lengths[start + first])
            for first, last in pairwise([0, *accumulate(sizes)])
        )
        padded = tokenizer.pad({"input_ids": [token_ids[i] for i in positions]}, padding=True, return_tensors="pt")
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        if shared:
            rows = len(positions)
            prefix_columns = torch.tensor(prefix, dtype=input_ids.dtype).expand(rows, shared)
            input_ids = torch.cat([prefix_columns, input_ids], dim=1)
            attention_mask = torch.cat([torch.ones(rows, shared, dtype=attention_mask.dtype), attention_mask], dim=1)
        groups.append(DecodeGroup(tuple(positions), input_ids, attention_mask, batches))
        start += group_rows
    prefix_ids = torch.tensor([prefix], dtype=torch.long) if shared else None
    return EncodedPrompts(tuple(groups), len(token_ids), prefix_ids)


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
        # On a GPU, HF compiles the forward for a static cache: once per batch shape here, costing more than it saves.
        disable_compile=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
    )


def _forward_kwargs(model: torch.nn.Module) -> dict[str, int]:
    """Asks for the last position's logits only where the model can (the prompt's logits are never used)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of the KV cache argument of the model's forward and generate: `cache` from transformers 5.2x
    on (where `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(outputs: Any) -> Cache | None:
    """The KV cache a forward returned, under either name (asking for `past_key_values` where the output calls it
    `cache` would log transformers' deprecation warning)."""
    return outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")


def prefix_cache(model: torch.nn.Module, prefix_ids: torch.Tensor) -> Cache | None:
    """The KV cache of the shared prefix, from the model's own forward (whatever its layer count or cache
    layout: a layer-path model has one cache slot per hop). None where the model gives no usable cache;
    the rows still hold the prefix then, so generation reads it with them."""
    if not callable(model):
        return None
    outputs = model(input_ids=prefix_ids, use_cache=True, **_forward_kwargs(model))
    cache = returned_cache(outputs)
    if not isinstance(cache, Cache) or cache.get_seq_length() != prefix_ids.shape[1]:
        return None
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() and keys.shape[-2] != prefix_ids.shape[1]:
            return None  # a layer that already dropped some of the prefix (sliding window): not reusable
    return cache


def static_cache(model: torch.nn.Module, slots: int, prefix: Cache | None = None, rows: int = 1) -> Cache | None:
    """HF's preallocated cache with `slots` positions per layer (its dynamic cache re-allocates every
    layer's keys and values at each step), holding `prefix` repeated over `rows` in its first slots.

    None for a model without an HF config or whose cache layers differ from the prefix's, and where a
    sliding-window layer would slide: its window counts cache slots, and the pads in the middle of the
    rows would then take the place of real tokens."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    cache = StaticCache(config=config, max_cache_len=slots)
    if any(getattr(layer, "is_sliding", False) and layer.max_cache_len < slots for layer in cache.layers):
        return None
    if prefix is not None:
        if len(prefix.layers) != len(cache.layers):
            return None
        for index, layer in enumerate(prefix.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    return cache


def prefilled_cache(
    model: torch.nn.Module, group: DecodeGroup, prefix_length: int, prefix: Cache | None, max_new_tokens: int
) -> Cache | None:
    """The group's cache holding every prompt token but each row's last (which `generate` then reads),
    filled batch by batch: each batch runs at its own width, and its keys and values land in the group's
    columns for it. None where the model cannot take a static cache: generate then reads the rows."""
    rows, width = group.input_ids.shape
    cache = static_cache(model, width + max_new_tokens)
    if cache is None:
        return None
    device = group.input_ids.device
    cached = prefix_length if prefix is not None else 0
    for batch in group.batches:
        columns = group.columns(batch, prefix_length).to(device)
        input_ids, attention_mask = group.input_ids[batch.rows][:, columns], group.attention_mask[batch.rows][:, columns]
        part = static_cache(model, batch.width - 1, prefix, len(input_ids))
        if part is None:
            return None
        if batch.width - 1 > cached:  # as generate derives them: each real token's place in its own prompt
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            model(input_ids=input_ids[:, cached:-1], attention_mask=attention_mask[:, :-1],
                  position_ids=position_ids[:, cached:-1], use_cache=True, **{cache_keyword(model): part},
                  **_forward_kwargs(model))
        for index, (layer, filled) in enumerate(zip(cache.layers, part.layers)):
            if not filled.is_initialized:
                continue  # nothing was read: no prefix and one-token rows
            if not layer.is_initialized:  # allocate and mark width - 1 slots as written (the pads stay zero)
                shape = (rows, filled.keys.shape[1], width - 1, filled.keys.shape[3])
                cache.update(filled.keys.new_zeros(shape), filled.values.new_zeros(shape), index)
            layer.keys[batch.rows, :, columns[:-1]] = filled.keys
            layer.values[batch.rows, :, columns[:-1]] = filled.values
    return cache


class Generations(list):
    """Generated texts (a list of str, one per prompt) and `tokens`: how many tokens each row generated."""

    tokens: list[int]


@torch.inference_mode()
def generate_encoded(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: EncodedPrompts,
    settings: GenerationSettings,
    progress: bool = True,
    description: str = "generate",
    share_prefix: bool = True,
) -> Generations:
    """Greedy generations for pre-encoded prompts, in the caller's original order, cut at the stop strings, with
    each row's count of generated tokens (`.tokens`: what the row cost, up to where it stopped).

    Raises FloatingPointError if a step's logits are not finite. With a shared prefix, the model reads it
    once here (`share_prefix=False` makes every batch read it again: same generations, for testing)."""
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no HF-style generate(); wrap it as a GenerationMixin model")
    device = getattr(model, "device", torch.device("cpu"))
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    shared = None
    if share_prefix and encoded.prefix_ids is not None:
        shared = prefix_cache(model, encoded.prefix_ids.to(device))
    generations = Generations([""] * encoded.count)
    generations.tokens = [0] * encoded.count
    pad = config.pad_token_id
    with tqdm(total=encoded.count, desc=description, unit="prompt", disable=not progress, leave=False) as bar:
        for group in encoded.groups:
            group = replace(group, input_ids=group.input_ids.to(device), attention_mask=group.attention_mask.to(device))
            width = group.input_ids.shape[1]
            stopping = StoppingCriteriaList()
            if settings.stop_strings:
                stopping.append(StopOnStrings(tokenizer, settings.stop_strings, width))
            cache = prefilled_cache(model, group, encoded.prefix_length, shared, settings.max_new_tokens)
            output = model.generate(
                input_ids=group.input_ids,
                attention_mask=group.attention_mask,
                generation_config=config,
                stopping_criteria=stopping,
                logits_processor=LogitsProcessorList([RaiseOnNonFiniteLogits()]),
                **({cache_keyword(model): cache} if cache is not None else {}),
            )
            new = output[:, width:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            counts = (new != pad).sum(dim=1).tolist() if pad is not None else [new.shape[1]] * len(texts)
            for position, text, count in zip(group.positions, texts, counts):
                generations[position] = cut_at_stop(text, settings.stop_strings)
                generations.tokens[position] = count
            bar.update(len(group.positions))
    return generations


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    progress: bool = True,
) -> list[str]:
    """Greedy generations for raw prompts (tokenizes them; an Evaluator encodes once and reuses instead)."""
    encoded = encode_prompts(
        tokenizer, prompts, settings.batch_size, settings.max_padding, settings.max_batch_tokens,
        max_decode_padding=settings.max_decode_padding,
    )
    return generate_encoded(model, tokenizer, encoded, settings, progress)
