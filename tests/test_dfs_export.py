"""A DFS path exported as a plain checkpoint: one stored layer per hop with the input scales folded into the
weights, loaded by transformers alone, computes the path model's logits; paths whose scales cannot be folded
keep evomerge's path format and say so."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM

from evomerge.export import ExportError, ExportWarning, export, export_command
from evomerge.modelio import load_model, load_tokenizer
from evomerge.pathmodel import PATH_FILE, PathModelError, build_path_model, unroll_obstacle, unroll_path_model
from evomerge.recipe import DFSRecipe, Hop

PROMPTS = ["問題：太郎はりんごを3個持っています。", "Question: Tom has 12 apples.\nAnswer:"]
# float32 rounding only (measured ~2e-7 on these logits of magnitude ~0.7), when RMSNorm's eps is 0.
FLOAT32_TOLERANCE = 1e-5
PATHS = {
    "repeated block": [Hop(0, 0, 1.0), Hop(0, 0, 1.3), Hop(0, 1, 0.7)],
    "equal block index of two models": [Hop(0, 0, 1.0), Hop(1, 0, 0.7), Hop(0, 1, 1.3), Hop(1, 1, 1.3)],
    "mixed, scaled, repeated": [Hop(1, 1, 0.7), Hop(0, 1, 1.3), Hop(1, 1, 1.1), Hop(0, 0, 0.9), Hop(1, 1, 0.7)],
}


def sources_with_eps(checkpoints: dict[str, Path], eps: float | None) -> list:
    """expert_a and expert_b in float32, RMSNorm's eps set to `eps` (None: the checkpoints' own, 1e-6)."""
    override = {} if eps is None else {"rms_norm_eps": eps}
    return [AutoModelForCausalLM.from_pretrained(checkpoints[name], **override).eval()
            for name in ("expert_a", "expert_b")]


@pytest.fixture(scope="module")
def batch(tiny_checkpoints):
    return load_tokenizer(tiny_checkpoints["base"])(PROMPTS, padding=True, return_tensors="pt")


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def eps_tolerance(unrolled, batch, eps: float) -> float:
    """How far RMSNorm's eps lets the folded model stray, relatively: each of its norms sees eps against the
    stream's mean square where the path model's saw eps / P_k^2, a relative change of up to ~eps / (2 * mean
    square) per norm. Taken as eps over the smallest mean square any token's stream has: ~4e-4 on these tiny
    random models, so ~3e-3 (the logits differ by <= 9e-4 here, against 2e-7 with eps = 0); real models'
    streams are far larger and their eps error correspondingly smaller."""
    with torch.no_grad():
        streams = unrolled(**batch, output_hidden_states=True).hidden_states[:-1]  # the last one is normed
    return eps / min(float(stream.pow(2).mean(-1).min()) for stream in streams)


@pytest.mark.parametrize("hops", PATHS.values(), ids=PATHS.keys())
def test_unrolled_path_loads_with_transformers_alone_and_computes_the_path(tiny_checkpoints, batch, tmp_path, hops):
    """Exactly (float32 rounding) with eps = 0, where folding is exact; within the eps bound with eps = 1e-6."""
    for eps in (0.0, None):
        sources = sources_with_eps(tiny_checkpoints, eps)
        path = build_path_model(hops, sources)
        out = tmp_path / f"eps{eps}"
        unroll_path_model(path).save_pretrained(out)
        plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no evomerge code runs on it
        assert len(plain.model.layers) == len(hops) and not plain.model.layers[0]._forward_pre_hooks
        expected = logits(path, batch)
        if eps == 0.0:
            tolerance = FLOAT32_TOLERANCE
        else:
            tolerance = eps_tolerance(plain, batch, plain.config.rms_norm_eps)
            assert 1e-5 < tolerance < 1e-2  # the bound is informative on these models
        torch.testing.assert_close(logits(plain, batch), expected, rtol=tolerance, atol=tolerance)
        with safe_open(out / "model.safetensors", "pt") as stored:  # a block used twice is stored twice
            assert {name.split(".")[2] for name in stored.keys() if ".layers." in name} == {
                str(k) for k in range(len(hops))}


def test_unscaled_unrolled_path_is_a_plain_copy_of_the_blocks(tiny_checkpoints, batch, tmp_path):
    """No scale to fold: the unrolled model computes exactly what the path model does."""
    sources = [load_model(tiny_checkpoints[name]) for name in ("expert_a", "expert_b")]
    path = build_path_model([Hop(1, 0, 1.0), Hop(1, 0, 1.0), Hop(0, 1, 1.0)], sources, embed_from=1)
    unroll_path_model(path).save_pretrained(tmp_path / "plain")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), batch), logits(path, batch))


def _recipe(checkpoints: dict[str, Path], first_scale: float) -> DFSRecipe:
    """Path a0 -> b0 -> a0 -> b1: equal block indices of two models, block a0 twice, scales 0.7 and 1.3
    (`first_scale` on the a0 -> b0 transition)."""
    scales = [[1.0] * 4 for _ in range(4)]
    scales[0][2], scales[2][0], scales[0][3] = first_scale, 1.3, 0.7  # global blocks: a0, a1, b0, b1
    return DFSRecipe((str(checkpoints["expert_a"]), str(checkpoints["expert_b"])), (2, 2), 2,
                     (1, 0, 1, 0, 1, 0, 0, 1), scales)


def _path_of(recipe: DFSRecipe):
    return build_path_model(recipe.path, [load_model(path) for path in recipe.models])


def test_export_writes_the_unrolled_model_with_the_owners_full_config(tiny_checkpoints, batch, tmp_path):
    recipe = _recipe(tiny_checkpoints, 0.7)
    assert [hop.scale for hop in recipe.path] == [1.0, 0.7, 1.3, 0.7]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # folding is exact: nothing to warn about
        model_dir = export(recipe.save(tmp_path / "r.yaml"), tmp_path / "ex") / "model"
    assert not (model_dir / PATH_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    tolerance = eps_tolerance(plain, batch, plain.config.rms_norm_eps)
    torch.testing.assert_close(logits(plain, batch), logits(_path_of(recipe), batch), rtol=tolerance,
                               atol=tolerance)
    owner = json.loads((tiny_checkpoints["expert_a"] / "config.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert config.pop("num_hidden_layers") == 4 and owner.pop("num_hidden_layers") == 2
    assert config == owner
    tokenizers = (load_tokenizer(model_dir), load_tokenizer(tiny_checkpoints["base"]))
    assert tokenizers[0](PROMPTS)["input_ids"] == tokenizers[1](PROMPTS)["input_ids"]
    assert "Unrolled: a plain `MistralForCausalLM` checkpoint" in (model_dir / "README.md").read_text()


def test_a_scale_of_zero_keeps_the_path_format_and_warns(tiny_checkpoints, batch, tmp_path):
    """The genome's default scale_range [0, 2] reaches 0, which RMSNorm does not pass through as a factor."""
    recipe = _recipe(tiny_checkpoints, 0.0)
    with pytest.warns(ExportWarning, match="path format, which only evomerge runs right: hop 1 scales its input by 0"):
        model_dir = export(recipe.save(tmp_path / "r.yaml"), tmp_path / "ex") / "model"
    assert (model_dir / PATH_FILE).is_file()
    assert "(not unrolled: hop 1 scales" in (model_dir / "README.md").read_text()
    assert torch.equal(logits(load_model(model_dir), batch), logits(_path_of(recipe), batch))


def test_the_path_format_on_request(tiny_checkpoints, tmp_path):
    """`evomerge export ... dfs_format=path` keeps evomerge's format, with no warning: it was asked for."""
    recipe_file = _recipe(tiny_checkpoints, 0.7).save(tmp_path / "r.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # asked for: no fallback to warn about
        model_dir = export_command(OmegaConf.create({"recipe": str(recipe_file), "out": str(tmp_path / "ex"),
                                                     "dfs_format": "path"})) / "model"
    assert (model_dir / PATH_FILE).is_file()
    assert "evomerge's layer-path format: each used block" in (model_dir / "README.md").read_text()
    with pytest.raises(ExportError, match="dfs_format must be one of"):
        export(recipe_file, tmp_path / "ex2", dfs_format="folded")


def test_paths_that_cannot_be_folded_are_named(tiny_checkpoints, batch):
    sources = [load_model(tiny_checkpoints[name]) for name in ("expert_a", "expert_b")]
    negative = build_path_model([Hop(0, 0, 1.0), Hop(1, 1, -0.5)], sources)
    assert unroll_obstacle(negative) == ("hop 1 scales its input by -0.5; only positive scales pass through "
                                         "RMSNorm unchanged")
    with pytest.raises(PathModelError, match="cannot be unrolled exactly: hop 1"):
        unroll_path_model(negative)
    # Gemma normalises each branch's output and scales its embeddings: its scales do not fold; unscaled, it unrolls.
    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    gemma = [GemmaForCausalLM(config).eval()]
    assert "gemma is not one of the pre-norm RMSNorm architectures" in unroll_obstacle(
        build_path_model([Hop(0, 1, 1.0), Hop(0, 0, 1.3)], gemma))
    unscaled = build_path_model([Hop(0, 1, 1.0), Hop(0, 1, 1.0)], gemma)
    assert unroll_obstacle(unscaled) is None
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(unroll_path_model(unscaled)(input_ids=ids).logits, unscaled(input_ids=ids).logits)
