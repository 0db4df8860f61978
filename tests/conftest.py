"""Shared fixtures: tiny random Mistral checkpoints (a base and perturbed 'experts') with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from evomerge.resources import CONF_DIR
from evomerge.zoo.tokenizer import train_tokenizer

# Unit tests use tiny models, where one thread is as fast as two and leaves the other core free.
torch.set_num_threads(1)

TEXTS = [
    "問題：太郎はりんごを3個持っています。5個もらいました。全部で何個ですか？\n答え：3 + 5 = 8。答えは8個です。",
    "Question: Tom has 12 apples. He gets 9 more. How many apples does he have?\nAnswer: 12 + 9 = 21. The answer is 21.",
    "質問：花子は何を持っていますか？\n答え：花子は青いぼうしを持っています。",
] * 10


def tiny_config(vocab_size: int, layers: int = 2) -> MistralConfig:
    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A base and two experts (base + seeded noise), each a complete HF directory with safetensors and tokenizer."""
    root = tmp_path_factory.mktemp("tiny_zoo")
    tokenizer = train_tokenizer(TEXTS, vocab_size=160)
    torch.manual_seed(0)
    base = MistralForCausalLM(tiny_config(len(tokenizer)))
    paths = {}
    for name, scale in [("base", 0.0), ("expert_a", 0.02), ("expert_b", 0.02)]:
        model = MistralForCausalLM(base.config)
        model.load_state_dict(base.state_dict())
        if scale:
            gen = torch.Generator().manual_seed(len(paths))
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def bf16_pool(root: Path, stds: dict[str, float | None], shared_std: float = 0.0) -> dict[str, Path]:
    """bf16 checkpoints whose task vectors tie a lot, as real bf16 fine-tunes do: a base of std 0.02 and models
    moved by a direction they share (N(0, shared_std)) plus N(0, std) of their own (None: the base itself), so
    deltas are a few bf16 ulps (~150k parameters each)."""
    config = MistralConfig(vocab_size=160, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    base = {name: torch.randn(tensor.shape, generator=generator) * 0.02 for name, tensor in model.state_dict().items()}
    shared = {name: torch.randn(value.shape, generator=generator) * shared_std if shared_std else 0.0
              for name, value in base.items()}
    paths = {}
    for name, std in stds.items():
        state = {key: (value if std is None else value + shared[key] + torch.randn(value.shape, generator=generator)
                       * std).to(torch.bfloat16) for key, value in base.items()}
        model.load_state_dict(state)
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def tied_bf16(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base and three fine-tunes moved by N(0, 1e-4), N(0, 2e-4) and N(0, 1.5e-4): the k-th largest
    |delta| is shared by 5-30% of a tensor's entries."""
    return bf16_pool(tmp_path_factory.mktemp("tied_bf16"),
                     {"base": 0.0, "expert_a": 1e-4, "expert_b": 2e-4, "expert_c": 1.5e-4})


BF16_ULP = 2.0**-7  # one unit in the last place, relative to the leading power of two


def bf16_differences(ours, theirs, label: str) -> tuple[int, int]:
    """Two bf16 checkpoints (`CheckpointReader`s) agree in every entry to one bf16 ulp: how many entries differ
    at all, of how many."""
    assert set(ours.names) == set(theirs.names)
    different = total = 0
    for name in ours.names:
        mine, other = ours.read(name), theirs.read(name)
        assert mine.dtype == other.dtype == torch.bfloat16, name
        mine, other = mine.float(), other.float()
        gap = (mine - other).abs()
        ulp = BF16_ULP * torch.exp2(torch.floor(torch.log2(torch.maximum(mine.abs(), other.abs()))))
        assert bool((gap <= ulp).all()), f"{label} {name}: max difference {float(gap.max())}"
        different += int((gap > 0).sum())
        total += gap.numel()
    return different, total


def run_mergekit(config: dict, out: Path):
    """mergekit 0.1.5's own merge of ``config`` into ``out``, read back (mergekit is a dev extra)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from evomerge.modelio import CheckpointReader

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return CheckpointReader(out)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    """The tiny checkpoints' tokenizer, loaded as generation needs it (left padding)."""
    from evomerge.modelio import load_tokenizer

    return load_tokenizer(tiny_checkpoints["base"])


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    """expert_a, loaded per module (a module may change it, e.g. its generation config)."""
    from evomerge.modelio import load_model

    return load_model(tiny_checkpoints["expert_a"])


@pytest.fixture(scope="session")
def micro_zoo_home(tmp_path_factory) -> Path:
    """A home directory holding the micro toy zoo (evomerge/conf/zoo/micro.yaml), built once per test session."""
    import yaml

    from evomerge.zoo.build import ZooSpec, build_zoo

    home = tmp_path_factory.mktemp("evomerge_home")
    spec = yaml.safe_load((CONF_DIR / "zoo" / "micro.yaml").read_text())
    build_zoo(ZooSpec.from_dict(spec), home)
    return home
