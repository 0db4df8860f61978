"""Model I/O in one place: every HF model, tokenizer and safetensors checkpoint is read and written here."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id, safetensors only, no remote code."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=resolve_dtype(dtype), use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
