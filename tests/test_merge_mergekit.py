"""evomerge's linear, task_arithmetic and ties equal mergekit's on the same tiny checkpoints (to bf16 rounding)."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import run_mergekit
from evomerge.merge.stream import merge_to_disk
from evomerge.modelio import CheckpointReader
from evomerge.recipe import PSRecipe

mergekit_config = pytest.importorskip("mergekit.config", reason="mergekit (a dev extra) is not installed")
mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (a dev extra) is not installed")

BF16_RESOLUTION = 2.0**-8


CASES = {
    "linear": (
        dict(weight=[0.7, 0.3]),
        {},
        lambda a, b: [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}],
        {"normalize": True},
    ),
    "task_arithmetic": (
        dict(weight=[0.8, 0.5]),
        {"lambda": 0.9},
        lambda a, b: [{"model": a, "parameters": {"weight": 0.8}}, {"model": b, "parameters": {"weight": 0.5}}],
        {"lambda": 0.9},
    ),
    "ties": (
        dict(weight=[0.6, 0.4], density=[0.5, 0.3]),
        {},
        lambda a, b: [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": b, "parameters": {"weight": 0.4, "density": 0.3}}],
        {"normalize": True},
    ),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_same_tensors_as_mergekit(tiny_checkpoints, tmp_path, method):
    values, options, mergekit_models, mergekit_parameters = CASES[method]
    base, first, second = (str(tiny_checkpoints[key]) for key in ("base", "expert_a", "expert_b"))
    recipe = PSRecipe.uniform(method, None if method == "linear" else base, [first, second],
                              parameters=options, **values)
    ours = CheckpointReader(merge_to_disk(recipe, tmp_path / "evomerge"))
    config = {"merge_method": method, "models": mergekit_models(first, second),
              "parameters": mergekit_parameters, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = base
    (tmp_path / "mergekit.yaml").write_text(yaml.safe_dump(config))  # kept for debugging a failure
    theirs = run_mergekit(config, tmp_path / "mergekit")
    assert set(ours.names) == set(theirs.names)
    for name in ours.names:
        expected = theirs.read(name)
        torch.testing.assert_close(ours.read(name), expected, rtol=BF16_RESOLUTION, atol=BF16_RESOLUTION * 1e-2,
                                   msg=lambda message: f"{method} {name}: {message}")


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.8])
def test_trim_agrees_with_mergekits_except_among_ties(density):
    """mergekit 0.1.5's `sparsify.magnitude` keeps int(density * numel) entries by an unstable argsort of |delta|.
    On a bf16 task vector that ties a lot, evomerge's trim keeps the same entries above the cut, none below it,
    and as many of the tied ones; only which tied ones may differ (evomerge keeps the lowest indices)."""
    from mergekit.sparsify import magnitude

    from evomerge.merge.methods import sparsify

    generator = torch.Generator().manual_seed(4)
    base = (torch.randn(300, 1000, generator=generator) * 0.02).to(torch.bfloat16)
    tensor = (base.float() + torch.randn(300, 1000, generator=generator) * 1e-4).to(torch.bfloat16)
    delta = tensor.float() - base.float()
    theirs = magnitude(delta, density) != 0
    trim = sparsify.trim(base, tensor, density)
    position = torch.arange(delta.numel()).reshape(delta.shape)
    ours = (delta.abs() > trim.threshold) | ((delta.abs() == trim.threshold) & (position < trim.cut))
    ours &= delta != 0
    above, tied = delta.abs() > trim.threshold, delta.abs() == trim.threshold
    assert torch.equal(ours & above, above) and torch.equal(theirs & above, above)
    assert not bool((ours | theirs)[~above & ~tied].any())
    if trim.threshold > 0:
        assert int((ours & tied).sum()) == int((theirs & tied).sum()) > 0
