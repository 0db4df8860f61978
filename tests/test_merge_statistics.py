"""Fisher diagonals and RegMean Gram matrices from prompts, and their safetensors cache."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge import statistics as stats
from evomerge.modelio import load_model, load_tokenizer
from evomerge.recipe import PSRecipe

PROMPTS = ["Question: Tom has 12 apples.", "問題：太郎はりんごを3個持っています。"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoints):
    return load_model(tiny_checkpoints["expert_a"]), load_tokenizer(tiny_checkpoints["expert_a"])


def test_fisher_is_the_mean_squared_gradient(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    fisher = stats.fisher_diagonal(model, tokenizer, PROMPTS)
    names, parameters = zip(*model.named_parameters())
    expected = [torch.zeros_like(parameter) for parameter in parameters]
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        for total, gradient in zip(expected, torch.autograd.grad(loss, parameters)):
            total += gradient**2 / len(PROMPTS)
    assert set(fisher) == set(names)
    for name, value in zip(names, expected):
        torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-12)


def test_gram_of_the_lm_head_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    grams = stats.gram_matrices(model, tokenizer, PROMPTS)
    assert "model.layers.0.self_attn.q_proj.weight" in grams and "model.embed_tokens.weight" not in grams
    with torch.no_grad():
        hidden = [model.model(**tokenizer(prompt, return_tensors="pt")).last_hidden_state[0] for prompt in PROMPTS]
    rows = torch.cat(hidden)
    torch.testing.assert_close(grams["lm_head.weight"], rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-6)
    assert grams["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)


def test_statistics_are_cached_as_safetensors(tiny_checkpoints, tmp_path, monkeypatch):
    first = stats.cached_statistics("gram", tiny_checkpoints["expert_b"], PROMPTS, tmp_path)
    files = list(tmp_path.glob("gram-expert_b-*.safetensors"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("statistics should come from the cache")

    monkeypatch.setattr(stats, "load_model", refuse)
    again = stats.cached_statistics("gram", tiny_checkpoints["expert_b"], PROMPTS, tmp_path)
    assert all(torch.equal(again[name], first[name]) for name in first)
    with pytest.raises(AssertionError):  # other prompts are another cache entry
        stats.cached_statistics("gram", tiny_checkpoints["expert_b"], PROMPTS[:1], tmp_path)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    assert stats.read_prompts(tmp_path / "p.txt", limit=2) == ["one", "two"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "q1"}) + "\n" + json.dumps({"prompt": "q2"}) + "\n")
    assert stats.read_prompts(tmp_path / "p.jsonl") == ["q1", "q2"]
    with pytest.raises(MergeError, match="does not exist"):
        stats.read_prompts(tmp_path / "none.txt")


def test_recipe_needs_prompts():
    recipe = PSRecipe.uniform("fisher", None, ["a", "b"])
    with pytest.raises(MergeError, match="needs parameters.prompts"):
        stats.recipe_statistics(recipe)
