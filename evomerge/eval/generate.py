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


# Each extra batch costs a full run of decoding steps, so length-sorted batches split only where padding
# would exceed this share of a batch's prompt tokens: uniform prompts stay in one batch (as fast as HF on
# one batch) and MGSM-JA's uneven ones split into a few. On the 1M-parameter toy Mistral with 200 MGSM-JA
# prompts (scripts/bench_eval.py), 0.1 beat 0.2-0.4 (3.0 s against 3.3-4.3 s; one padded batch: 7.8 s).
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_PADDING = 0.1


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
    input_ids: torch.Tensor  # left-padded to the longest row of this batch
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts tokenized once and grouped into length-sorted padded batches, reused for every model."""

    batches: tuple[PromptBatch, ...]
    count: int


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_padding: float = DEFAULT_MAX_PADDING,
    max_batch_tokens: int | None = None,
) -> EncodedPrompts:
    """Tokenize once, sort by length (longest first, so memory problems show at once), pad each batch left.

    A batch grows while it has at most `batch_size` rows, padding is at most `max_padding` of its
    prompt tokens, and (if set) rows x width stays within `max_batch_tokens`.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (load it with evomerge.modelio.load_tokenizer)")
    token_ids = tokenizer(list(prompts))["input_ids"]
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
            if max_batch_tokens is not None and rows * width > max_batch_tokens:
                break
            end, real_tokens = end + 1, candidate_tokens
        positions = order[start:end]
        padded = tokenizer.pad({"input_ids": [token_ids[i] for i in positions]}, padding=True, return_tensors="pt")
        batches.append(PromptBatch(tuple(positions), padded["input_ids"], padded["attention_mask"]))
        start = end
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
    encoded = encode_prompts(tokenizer, prompts, settings.batch_size, settings.max_padding, settings.max_batch_tokens)
    return generate_encoded(model, tokenizer, encoded, settings, progress)
