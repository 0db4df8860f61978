"""Batched greedy decoding on top of HF `generate`: left padding, length-sorted batches, stop strings.

HF `generate` with a KV cache is already fast (a hand-written greedy loop measured 0.8x of it), so this
module only arranges the work around it: prompts are tokenized once and grouped by length so batches
carry little padding, each batch stops as soon as every row has produced a stop string or EOS, and the
results come back in the caller's order. Anything with the HF causal-LM `generate` surface works, the
layer-path (DFS) models included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList


# Measured on the 1M-parameter toy Mistral (scripts/bench_eval.py): a budget of ~8k prompt tokens per batch
# keeps uniform short prompts in one big batch (as fast as HF on a single batch) and splits MGSM-length
# prompts into batches of 23-63 rows (2.5x faster than one padded batch).
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE  # most rows per batch
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS  # most rows x padded prompt width per batch

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.max_batch_tokens or 1) < 1:
            raise ValueError(f"max_new_tokens, batch_size and max_batch_tokens must be positive, got {self}")

    def result_defining(self) -> dict[str, object]:
        """The settings that change generations (batching does not: batched equals one-at-a-time)."""
        return {"decoding": "greedy", "max_new_tokens": self.max_new_tokens, "stop_strings": list(self.stop_strings)}


@dataclass(frozen=True)
class PromptBatch:
    positions: tuple[int, ...]  # where each row sits in the caller's prompt list
    input_ids: torch.Tensor  # left-padded to the longest row of this batch
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts tokenized once and grouped into length-sorted padded batches, reused for every model."""

    batches: tuple[PromptBatch, ...]
    count: int


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int, max_batch_tokens: int | None = None
) -> EncodedPrompts:
    """Tokenize once, sort by length (longest first, so memory problems show at once), pad each batch left.

    A batch takes up to `batch_size` rows and, when `max_batch_tokens` is set, only as many as keep
    rows x padded prompt width within it: short prompts share big batches, long ones get smaller ones.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (load it with evomerge.modelio.load_tokenizer)")
    token_ids = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(token_ids)), key=lambda index: -len(token_ids[index]))
    batches = []
    start = 0
    while start < len(order):
        width = len(token_ids[order[start]])  # the longest row of this batch, as the order is descending
        rows = batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // max(width, 1)))
        positions = order[start : start + rows]
        padded = tokenizer.pad({"input_ids": [token_ids[i] for i in positions]}, padding=True, return_tensors="pt")
        batches.append(PromptBatch(tuple(positions), padded["input_ids"], padded["attention_mask"]))
        start += rows
    return EncodedPrompts(tuple(batches), len(token_ids))


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


@torch.inference_mode()
def generate_encoded(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: EncodedPrompts,
    settings: GenerationSettings,
    progress: bool = True,
    description: str = "generate",
) -> list[str]:
    """Greedy generations for pre-encoded prompts, in the caller's original order, cut at the stop strings."""
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no HF-style generate(); wrap it as a GenerationMixin model")
    device = getattr(model, "device", torch.device("cpu"))
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    generations: list[str] = [""] * encoded.count
    with tqdm(total=encoded.count, desc=description, unit="prompt", disable=not progress, leave=False) as bar:
        for batch in encoded.batches:
            prompt_width = batch.input_ids.shape[1]
            stopping = StoppingCriteriaList()
            if settings.stop_strings:
                stopping.append(StopOnStrings(tokenizer, settings.stop_strings, prompt_width))
            output = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stopping,
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
    encoded = encode_prompts(tokenizer, prompts, settings.batch_size, settings.max_batch_tokens)
    return generate_encoded(model, tokenizer, encoded, settings, progress)
