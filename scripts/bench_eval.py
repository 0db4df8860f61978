"""Benchmark the evaluator's generation against HF `generate` on one padded batch and a per-sample loop.

All three decode the same prompts greedily with the same stop strings and max_new_tokens, from prompt
strings to cut texts (tokenization and decoding included), and must give identical generations.
Without --model a ~1M-parameter random Mistral (hidden 128, 4 layers, 4 heads, intermediate 384,
vocab ~500) with a BPE trained on MGSM text is built in a temporary directory. Prompt sets:
`mgsm` = the MGSM-JA zero-shot prompts (uneven lengths, a long shared instruction header that the
evaluator reads once), `toy` = short toy-zoo style prompts (an 18-token shared question stem).
`--min-shared-prefix 0` turns prefix sharing off.

    flock /tmp/evomerge-heavy.lock .venv/bin/python scripts/bench_eval.py --prompts mgsm --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from evomerge.eval.generate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_DECODE_PADDING,
    DEFAULT_MAX_PADDING,
    MIN_SHARED_PREFIX,
    EncodedPrompts,
    GenerationSettings,
    cut_at_stop,
    encode_prompts,
    generate_encoded,
    greedy_config,
)
from evomerge.eval.task import load_task
from evomerge.modelio import load_model, load_tokenizer
from evomerge.resources import DATA_DIR
from evomerge.zoo.tokenizer import train_tokenizer

MGSM_DIR = DATA_DIR / "mgsm"  # the MGSM data shipped with evomerge


def build_toy_model(directory: Path) -> Path:
    """A random ~1M-parameter Mistral with a 500-token BPE trained on MGSM (ja + en) text and toy prompts."""
    texts = [line.split("\t")[0] for name in ("mgsm_ja.tsv", "mgsm_en.tsv") for line in (MGSM_DIR / name).open()]
    tokenizer = train_tokenizer(texts + toy_prompts(50), vocab_size=500)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def toy_prompts(count: int) -> list[str]:
    return [f"Question: Tom has {3 + i} apples. He gets {i % 7 + 2} more. How many apples does he have?\nAnswer:" for i in range(count)]


def mgsm_prompts(count: int) -> list[str]:
    task = load_task("mgsm_ja")  # reads MGSM_DIR
    examples = task.load_split("test").examples
    return [task.build_prompt(examples[i % len(examples)].question) for i in range(count)]


def hf_generate(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[str]:
    """Plain HF: one tokenizer call, one `generate` (HF's own stop_strings), decode, cut at the stop string."""
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    config.stop_strings = list(settings.stop_strings) or None
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config, tokenizer=tokenizer)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [cut_at_stop(text, settings.stop_strings) for text in texts]


def timed(methods: dict[str, Callable[[], list[str]]], repeats: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Each method's best wall time over `repeats` rounds, the methods taking turns within each round (the
    machine is shared: taking turns spreads a slow spell over all of them, the minimum is the least disturbed)."""
    best = {name: float("inf") for name in methods}
    results: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, function in methods.items():
            start = time.perf_counter()
            results[name] = function()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an HF model directory (default: build the random toy Mistral)")
    parser.add_argument("--prompts", choices=["mgsm", "toy"], default="mgsm")
    parser.add_argument("--n", type=int, default=200, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--stop", action="append", help="stop string (repeatable; default: a newline)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="the evaluator's most rows per batch")
    parser.add_argument(
        "--max-padding", type=float, default=DEFAULT_MAX_PADDING, help="the evaluator's most padding share per prompt batch"
    )
    parser.add_argument(
        "--max-decode-padding",
        type=float,
        default=DEFAULT_MAX_DECODE_PADDING,
        help="the evaluator's most padding share per decode group",
    )
    parser.add_argument(
        "--min-shared-prefix",
        type=int,
        default=MIN_SHARED_PREFIX,
        help="the evaluator reads a common token prefix at least this long once per call (0: never)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or build_toy_model(Path(scratch) / "toy")
        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        prompts = mgsm_prompts(args.n) if args.prompts == "mgsm" else toy_prompts(args.n)
        settings = GenerationSettings(
            args.max_new_tokens,
            tuple(args.stop or ["\n"]),
            args.batch_size,
            args.max_padding,
            max_decode_padding=args.max_decode_padding,
        )
        hf_generate(model, tokenizer, prompts[:4], settings)  # warm-up: first calls pay one-off costs

        def encode() -> EncodedPrompts:
            return encode_prompts(
                tokenizer,
                prompts,
                settings.batch_size,
                settings.max_padding,
                min_shared_prefix=args.min_shared_prefix or None,
                max_decode_padding=settings.max_decode_padding,
            )

        methods = {
            # As an Evaluator's first candidate: tokenize and group, then generate (prefix read included).
            "evaluator": lambda: generate_encoded(model, tokenizer, encode(), settings, progress=False),
            "hf_batched": lambda: hf_generate(model, tokenizer, prompts, settings),
            "loop": lambda: [hf_generate(model, tokenizer, [p], settings)[0] for p in prompts],
        }
        seconds, texts = timed(methods, args.repeats)

    # Tokens of the returned (stop-cut) generations, re-encoded: what the evaluator delivers per second.
    generated_tokens = sum(len(ids) for ids in tokenizer(texts["evaluator"], add_special_tokens=False)["input_ids"])
    encoded = encode()
    evaluator_s = seconds["evaluator"]
    summary = {
        "prompts": args.prompts,
        "n": len(prompts),
        "evaluator_s": round(evaluator_s, 3),
        "hf_batched_s": round(seconds["hf_batched"], 3),
        "loop_s": round(seconds["loop"], 3),
        "vs_hf_batched": round(seconds["hf_batched"] / evaluator_s, 2),
        "vs_loop": round(seconds["loop"] / evaluator_s, 2),
        "identical": texts["evaluator"] == texts["hf_batched"] == texts["loop"],
        "tokens_per_s": round(generated_tokens / evaluator_s, 1),
        "shared_prefix_tokens": encoded.prefix_length,
        "evaluator_groups": len(encoded.groups),
        "evaluator_prompt_batches": sum(len(group.batches) for group in encoded.groups),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(summary))
        return
    prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    print(
        f"model: {model_dir if args.model else 'random toy Mistral'} ({sum(p.numel() for p in model.parameters()):,} params), "
        f"{len(prompts)} {args.prompts} prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens, "
        f"max_new_tokens={settings.max_new_tokens}, stop={list(settings.stop_strings)}, "
        f"evaluator: {summary['evaluator_groups']} decode groups (at most {settings.batch_size} rows, "
        f"{settings.max_decode_padding:.0%} padding) read in {summary['evaluator_prompt_batches']} prompt batches "
        f"({settings.max_padding:.0%} padding), shared prefix {summary['shared_prefix_tokens']} tokens, "
        f"torch threads={torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"evaluator           {evaluator_s:8.2f} s   {generated_tokens / evaluator_s:8.1f} generated tokens/s")
    for name, label in (("hf_batched", "HF one padded batch"), ("loop", "per-sample loop    ")):
        print(f"{label} {seconds[name]:8.2f} s   evaluator speed-up {seconds[name] / evaluator_s:5.2f}x")
    print(f"identical generations: {summary['identical']}")


if __name__ == "__main__":
    main()
