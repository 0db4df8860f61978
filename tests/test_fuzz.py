"""Property-based: any genome -- inside the unit box, on its faces, far beyond it, infinite -- decodes to a valid
recipe that merges in memory into a model whose forward pass is finite, and the recipe survives YAML unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge.memory import InMemoryMerger
from evomerge.merge.methods import METHODS as METHOD_SPECS
from evomerge.recipe import PSRecipe, RecipeError
from evomerge.search.genome import PSGenomeSpace

GROUPS = ("embed", "blocks.0", "blocks.1", "head")
EDGES = [0.0, -0.0, 1.0, 5e-324, 1 - 1e-16, 1 + 1e-16, -1e-16, -1e300, 1e300, math.inf, -math.inf]
# every method with something to search and no prompt statistics (those need prompts: test_merge_statistics)
METHODS = sorted(name for name, spec in METHOD_SPECS.items() if spec.values and spec.statistics is None)


@pytest.fixture(scope="module")
def pool(tiny_checkpoints):
    base, models = str(tiny_checkpoints["base"]), (str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"]))
    return base, models, InMemoryMerger(base, models)


def space(pool, method: str, shared: bool) -> PSGenomeSpace:
    base, models, _ = pool
    return PSGenomeSpace(method=method, base=base if METHOD_SPECS[method].takes_base else None, models=models,
                         groups=GROUPS, shared=shared)


coordinate = st.one_of(st.floats(min_value=-3.0, max_value=4.0), st.sampled_from(EDGES))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), shared=st.booleans(), data=st.data())
def test_any_genome_decodes_merges_and_runs_finite(pool, tmp_path_factory, method, shared, data):
    genome_space = space(pool, method, shared)
    genome = np.array(data.draw(st.lists(coordinate, min_size=genome_space.dim, max_size=genome_space.dim)))
    recipe = genome_space.decode(genome)

    for group in recipe.groups:  # decoded values stay inside the method's search ranges
        for key, value in group.values.items():
            low, high = genome_space.range(key)
            assert all(low <= v <= high for v in (value if isinstance(value, tuple) else (value,)))
    assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe
    saved = recipe.save(tmp_path_factory.mktemp("recipe") / "recipe.yaml")
    loaded = PSRecipe.load(saved)
    assert loaded == recipe and loaded.hash == recipe.hash and loaded.to_yaml() == recipe.to_yaml()

    model = pool[2].merge(recipe)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.arange(1, 17).unsqueeze(0)).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_a_nan_genome_is_a_clear_recipe_error(pool):
    genome_space = space(pool, "ties", shared=True)
    with pytest.raises(RecipeError, match="must be finite, got nan"):
        genome_space.decode(np.full(genome_space.dim, np.nan))
