"""Broken or foreign variants of the tiny test checkpoints, for bad-input and security tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UP_PROJ = "model.layers.1.mlp.up_proj.weight"


def derived_checkpoint(source: Path, destination: Path, edit: Callable[[dict], None] | None = None,
                       edit_config: Callable[[dict], None] | None = None,
                       edit_tokenizer: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``source`` with its tensors, config.json and/or tokenizer.json edited in place by the callbacks."""
    shutil.copytree(source, destination)
    if edit is not None:
        tensors = load_file(destination / "model.safetensors")
        edit(tensors)
        save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    for callback, name in ((edit_config, "config.json"), (edit_tokenizer, "tokenizer.json")):
        if callback is not None:
            data = json.loads((destination / name).read_text(encoding="utf-8"))
            callback(data)
            (destination / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return destination


def narrower(tensors: dict) -> None:
    tensors[UP_PROJ] = tensors[UP_PROJ][:48].clone()


def bigger_vocab(tensors: dict) -> None:
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name][:3]])


def bigger_vocab_config(config: dict) -> None:
    config["vocab_size"] += 3


def swapped_tokens(tokenizer: dict) -> None:
    """Same vocabulary size, two tokens trading ids: a different tokenizer."""
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[40:42]
    vocab[first], vocab[second] = vocab[second], vocab[first]


def llama_twin(mistral_dir: Path, destination: Path) -> Path:
    """A Llama model with the Mistral checkpoint's tensor names and shapes: only the architecture differs."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

    mistral = MistralForCausalLM.from_pretrained(mistral_dir)
    llama = LlamaForCausalLM(LlamaConfig(**{key: getattr(mistral.config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")}))
    llama.save_pretrained(destination)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (mistral_dir / name).exists():
            shutil.copy2(mistral_dir / name, destination / name)
    return destination


def pickle_checkpoint(source: Path, destination: Path) -> Path:
    """``source`` with its safetensors weights replaced by a pickle ``pytorch_model.bin`` (torch.save)."""
    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    (destination / "model.safetensors").unlink()
    torch.save(tensors, destination / "pytorch_model.bin")
    return destination


def remote_code_checkpoint(source: Path, destination: Path, marker: Path) -> Path:
    """``source`` declaring its own model class in a .py file (``auto_map``), which touches ``marker`` if run."""
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(model_type="evomerge_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (destination / "config.json").write_text(json.dumps(config))
    (destination / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import MistralConfig, MistralForCausalLM\n"
        "class CustomConfig(MistralConfig):\n    model_type = 'evomerge_custom'\n"
        "class CustomModel(MistralForCausalLM):\n    config_class = CustomConfig\n")
    return destination
