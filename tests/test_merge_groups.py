"""Layer groups from tensor names (Mistral, Llama, Qwen2, GPT-2 naming) and the block-range helper."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from evomerge.errors import MergeError
from evomerge.merge.groups import (
    TensorPlace,
    assign_groups,
    block_ranges,
    count_blocks,
    group_names,
    parse_group_name,
    tensor_place,
)
from evomerge.modelio import CheckpointReader


@pytest.mark.parametrize(
    ("name", "place"),
    [
        ("model.embed_tokens.weight", TensorPlace("embed")),
        ("model.layers.0.self_attn.q_proj.weight", TensorPlace("block", 0)),
        ("model.layers.11.self_attn.q_proj.bias", TensorPlace("block", 11)),  # Qwen2 biases
        ("model.layers.3.post_attention_layernorm.weight", TensorPlace("block", 3)),
        ("model.norm.weight", TensorPlace("head")),
        ("lm_head.weight", TensorPlace("head")),
        ("transformer.wte.weight", TensorPlace("embed")),  # GPT-2
        ("transformer.wpe.weight", TensorPlace("embed")),
        ("transformer.h.5.attn.c_attn.weight", TensorPlace("block", 5)),
        ("transformer.ln_f.weight", TensorPlace("head")),
    ],
)
def test_tensor_place(name, place):
    assert tensor_place(name) == place


def _names_of(tmp_path, model):
    model.save_pretrained(tmp_path)
    return CheckpointReader(tmp_path).names


@pytest.mark.parametrize(
    "build",
    [
        lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)),
        lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                             tie_word_embeddings=True)),
    ],
    ids=["llama", "qwen2-tied"],
)
def test_groups_found_from_real_checkpoints(tmp_path, build):
    names = _names_of(tmp_path, build())
    assert count_blocks(names) == 3
    assignment = assign_groups(names, ["embed", "blocks.0", "blocks.1-2", "head"])
    assert assignment["model.embed_tokens.weight"] == 0
    assert assignment["model.layers.0.mlp.down_proj.weight"] == 1
    assert assignment["model.layers.2.input_layernorm.weight"] == 2
    assert assignment["model.norm.weight"] == 3
    assert all(assignment[name] == 2 for name in names if ".layers.1." in name)


def test_mistral_fixture_has_two_blocks(tiny_checkpoints):
    names = CheckpointReader(tiny_checkpoints["base"]).names
    assert count_blocks(names) == 2
    assert set(assign_groups(names, ["embed", "blocks", "head"]).values()) == {0, 1, 2}


def test_block_ranges_split_evenly_and_contiguously():
    assert block_ranges(10, 3) == [(0, 3), (4, 6), (7, 9)]
    assert block_ranges(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert block_ranges(5, 1) == [(0, 4)]
    assert group_names(4, 2) == ["embed", "blocks.0-1", "blocks.2-3", "head"]
    assert group_names(3, 3) == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]


@pytest.mark.parametrize("ranges", [0, 5, -1])
def test_block_ranges_refuse_a_count_that_does_not_fit(ranges):
    with pytest.raises(MergeError, match="cannot split 4 blocks into"):
        block_ranges(4, ranges)


def test_group_names_parse():
    assert parse_group_name("blocks.2-5").first == 2 and parse_group_name("blocks.2-5").last == 5
    assert parse_group_name("blocks.7").last == 7
    for bad in ("block.1", "blocks.3-1", "embed.1", "mlp"):
        with pytest.raises(MergeError):
            parse_group_name(bad)


def test_assign_groups_refuses_gaps_and_overlaps():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.1.a.weight", "lm_head.weight"]
    with pytest.raises(MergeError, match="'model.layers.1.a.weight' .*block 1.* none of the recipe's groups"):
        assign_groups(names, ["embed", "blocks.0", "head"])
    with pytest.raises(MergeError, match="overlap"):
        assign_groups(names, ["embed", "blocks.0-1", "blocks.1", "head"])
    with pytest.raises(MergeError, match="gaps in its block indices"):
        count_blocks(["model.layers.0.a.weight", "model.layers.2.a.weight"])
