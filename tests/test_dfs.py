"""Data-flow-space search: recipes, genomes, the path model over resident blocks, NSGA-II, the search and
the PS+DFS pipeline on the micro zoo, export and loading back."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from evomerge.cli import main
from evomerge.eval.generate import cache_keyword, returned_cache
from evomerge.modelio import load_model, load_tokenizer
from evomerge.pathmodel import (
    PathModelError,
    build_path_model,
    recipe_path_model,
    save_path_model,
    unique_parameters,
)
from evomerge.pool import resolve_pool
from evomerge.recipe import DFSRecipe, Hop, PSRecipe, RecipeError, load_recipe
from evomerge.search.dfs import choose, make_problem, over_length, pareto_front
from evomerge.search.genome import DFSGenomeSpace
from evomerge.search.optimizer import NSGA2

PROMPTS = ["問題：太郎はりんごを3個持っています。", "Question: Tom has 12 apples.\nAnswer:"]


def _recipe(include, blocks=4, scales=None, **kwargs) -> DFSRecipe:
    scales = scales if scales is not None else [[1.0] * blocks for _ in range(blocks)]
    return DFSRecipe(("a", "b"), (blocks // 2, blocks // 2), max(1, len(include) // blocks), tuple(include), scales, **kwargs)


def test_recipe_path_walks_slots_with_the_scale_of_each_transition():
    scales = [[1.0, 0.5, 0.7, 0.9], [1.1, 1.0, 1.2, 1.3], [1.4, 1.5, 1.0, 1.6], [1.7, 1.8, 1.9, 1.0]]
    recipe = _recipe([1, 0, 1, 0, 0, 1, 0, 1], scales=scales)  # slots 0, 2 | 5 (= block 1), 7 (= block 3)
    assert recipe.path == (Hop(0, 0, 1.0), Hop(1, 0, 0.7), Hop(0, 1, 1.5), Hop(1, 1, 1.3))
    assert recipe.slots == 8 and recipe.blocks == 4


def test_recipe_hash_depends_only_on_the_path_and_yaml_round_trips(tmp_path):
    a = _recipe([1, 1, 0, 0, 0, 0, 0, 0])
    unused = [[1.0] * 4 for _ in range(4)]
    unused[3][2] = 0.2  # block 3 never precedes block 2 on this path
    b = _recipe([1, 1, 0, 0, 0, 0, 0, 0], scales=unused)
    assert a.hash == b.hash and a != b
    assert _recipe([1, 0, 1, 0, 0, 0, 0, 0]).hash != a.hash
    b.save(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": [1, 0, 1]}, "include has 3 entries; 4 blocks x 1 repeats make 4 slots"),
        ({"include": [1] * 8, "scales": [[1.0] * 3] * 4}, "scales must be a 4 x 4 matrix"),
        ({"include": [1] * 8, "embed_from": 2}, "embed_from must index one of the 2 models"),
        ({"include": [1] * 8, "scales": [[float("nan")] * 4] * 4}, "must be finite"),
    ],
)
def test_bad_recipes_are_named(kwargs, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        _recipe(**kwargs)


def test_evollm_sized_space_has_192_slots_and_a_64_by_64_matrix():
    """EvoLLM's setting on paper: two 32-layer models, r = 3."""
    space = DFSGenomeSpace(("shisa-gamma-7b", "WizardMath-7B"), (32, 32), repeats=3)
    assert (space.slots, space.blocks, space.dim) == (192, 64, 192 + 64 * 64)
    genome = np.random.default_rng(0).random(space.dim)
    recipe = space.decode(genome)
    assert len(recipe.include) == 192 and len(recipe.scales) == 64 and all(len(r) == 64 for r in recipe.scales)
    assert all(0.0 <= hop.scale <= 2.0 for hop in recipe.path) and recipe.path[-1].layer < 32
    optimizer = NSGA2(space.slots, space.blocks**2, 2, seed=0, popsize=4,
                      initial=space.initial_population(4, seed=0, include_probability=0.33))
    asked = optimizer.ask()
    optimizer.tell(asked, [[0.1 * i, -float(g[:192].sum())] for i, g in enumerate(asked)])
    assert all(g.shape == (space.dim,) for g in optimizer.ask())


def test_initial_population_starts_from_each_models_own_path():
    space = DFSGenomeSpace(("a", "b"), (2, 3), repeats=2)
    population = space.initial_population(6, seed=1, include_probability=0.5)
    assert [space.decode(g).path for g in population[:2]] == [
        (Hop(0, 0, 1.0), Hop(0, 1, 1.0)), (Hop(1, 0, 1.0), Hop(1, 1, 1.0), Hop(1, 2, 1.0))]
    assert all(space.decode(g).path for g in population)
    with pytest.raises(Exception, match="must contain 1"):
        DFSGenomeSpace(("a",), (2,), 1, scale_range=(1.5, 2.0))


def test_nsga2_is_deterministic_and_mixes_binary_and_real_coordinates():
    space = DFSGenomeSpace(("a", "b"), (2, 2), repeats=3)

    def history():
        optimizer = NSGA2(space.slots, 16, 2, seed=5, popsize=6,
                          initial=space.initial_population(6, seed=5, include_probability=0.4))
        asked_all = []
        for _ in range(4):
            asked = optimizer.ask()
            optimizer.tell(asked, [[float(g[12:].mean()), -float(g[:12].sum())] for g in asked])
            asked_all += asked
        return asked_all

    first, second = history(), history()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(set(np.unique(g[:12])) <= {0.0, 1.0} for g in first)
    assert len({round(float(v), 9) for g in first for v in g[12:]}) > 2  # the scales evolve


def _survivors(optimizer: NSGA2) -> list[np.ndarray]:
    """The genomes of pymoo's current population: NSGA-II's survivors (the wrapper exposes no population)."""
    return [optimizer._from_pymoo(x) for x in optimizer._algorithm.pop.get("X")]


def _feasible_first(survivors, told, length, limit) -> bool:
    """Constraint dominance as survival: a path over the limit survives only while every path within it told so
    far still does (none was dropped for it); once paths within the limit fill the population, only they stay."""
    kept = {tuple(g) for g in survivors}
    return all(length(g) <= limit for g in survivors) or all(tuple(g) in kept for g in told if length(g) <= limit)


def test_nsga2_with_a_length_constraint_keeps_paths_within_it_over_longer_ones():
    """The fitness rewards long paths; `violation` (path length over 3) makes them infeasible, so they survive
    only where too few paths within the limit were found -- and not at all once enough were."""
    space = DFSGenomeSpace(("a", "b"), (2, 2), repeats=3)
    limit, told = 3, []
    length = lambda genome: len(space.decode(genome).path)  # noqa: E731
    optimizer = NSGA2(space.slots, 16, 2, seed=3, popsize=6,
                      initial=space.initial_population(6, seed=3, include_probability=0.4),
                      violation=functools.partial(over_length, space, limit))
    for _ in range(8):
        asked = optimizer.ask()
        optimizer.tell(asked, [[float(g[:12].sum()), float(g[12:].mean())] for g in asked])
        told += asked
        assert _feasible_first(_survivors(optimizer), told, length, limit)
    assert any(length(g) > limit for g in told)  # the search did try longer paths
    assert all(length(g) <= limit for g in _survivors(optimizer))


@pytest.fixture(scope="module")
def sources(tiny_checkpoints):
    return [load_model(tiny_checkpoints["expert_a"]), load_model(tiny_checkpoints["expert_b"])]


@pytest.fixture(scope="module")
def batch(tiny_checkpoints):
    return load_tokenizer(tiny_checkpoints["base"])(PROMPTS, padding=True, return_tensors="pt")


def test_identity_path_gives_exactly_the_models_logits_and_generations(sources, batch):
    for index, source in enumerate(sources):
        path = build_path_model([Hop(index, layer, 1.0) for layer in range(2)], sources, embed_from=index)
        with torch.no_grad():
            assert torch.equal(path(**batch).logits, source(**batch).logits)
        assert torch.equal(path.generate(**batch, max_new_tokens=6, do_sample=False),
                           source.generate(**batch, max_new_tokens=6, do_sample=False))


PATH_SHAPES = {
    "repeated block": [Hop(0, 0, 1.0), Hop(0, 0, 1.0), Hop(0, 1, 1.0)],
    "equal block index of two models": [Hop(0, 0, 1.0), Hop(0, 1, 1.0), Hop(1, 0, 1.0)],
    "mixed, scaled, repeated": [Hop(1, 1, 0.7), Hop(0, 1, 1.3), Hop(1, 1, 1.1), Hop(0, 0, 0.9)],
}


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("hops", PATH_SHAPES.values(), ids=PATH_SHAPES.keys())
def test_cached_decoding_equals_the_uncached_forward_for_every_path_shape(sources, tokenizer, hops, padded):
    """Each hop has its own cache slot: prefill + token-by-token decoding with the cache gives the logits of one
    uncached forward over the whole sequence (hops that shared a slot made these differ, or fail when padded)."""
    path = build_path_model(hops, sources)
    prompts = PROMPTS if padded else PROMPTS[:1]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    new_tokens = torch.tensor([[5, 9, 7]] * len(prompts))
    with torch.no_grad():
        out = path(**batch, use_cache=True)
        cache, mask = returned_cache(out), batch["attention_mask"]
        for step in range(new_tokens.shape[1]):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            out = path(input_ids=new_tokens[:, step:step + 1], attention_mask=mask, use_cache=True,
                       **{cache_keyword(path): cache})
        full = path(input_ids=torch.cat([batch["input_ids"], new_tokens], dim=1), attention_mask=mask,
                    use_cache=False)
    assert len(cache.layers) == len(hops)  # one slot per hop
    torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(path.generate(**batch, max_new_tokens=6, do_sample=False),
                       path.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False))


def test_a_hops_scale_multiplies_its_input_stream(sources, batch):
    """Scale 1.7 on the first hop == the unscaled path fed embeddings multiplied by 1.7."""
    scaled = build_path_model([Hop(0, 0, 1.7), Hop(1, 1, 1.0)], sources)
    plain = build_path_model([Hop(0, 0, 1.0), Hop(1, 1, 1.0)], sources)
    embeds = sources[0].get_input_embeddings()(batch["input_ids"]) * 1.7
    with torch.no_grad():
        expected = plain(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        assert torch.equal(scaled(**batch).logits, expected)
        assert not torch.allclose(plain(**batch).logits, expected)


def test_unscaled_path_equals_a_plain_model_holding_copies_of_its_blocks(sources, batch):
    """An independent reference: an ordinary MistralForCausalLM whose layer k is a copy of hop k's block."""
    from transformers import MistralForCausalLM

    hops = PATH_SHAPES["equal block index of two models"]
    path = build_path_model(hops, sources)
    config = sources[0].config.__class__(**{**sources[0].config.to_dict(), "num_hidden_layers": len(hops)})
    config.layer_types = None
    plain = MistralForCausalLM(config).eval()
    state = {k: v for k, v in sources[0].state_dict().items() if ".layers." not in k}
    for index, hop in enumerate(hops):
        for name, tensor in sources[hop.model].model.layers[hop.layer].state_dict().items():
            state[f"model.layers.{index}.{name}"] = tensor
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(path(**batch).logits, plain(**batch).logits, rtol=0, atol=0)


def test_path_model_borrows_blocks_without_copies_and_caches_each_hop(sources, batch):
    hops = [Hop(0, 0, 1.0), Hop(1, 1, 1.3), Hop(0, 0, 0.8), Hop(1, 1, 1.0), Hop(0, 1, 1.1)]
    path = build_path_model(hops, sources)
    source_pointers = {p.data_ptr() for model in sources for p in model.parameters()}
    assert {p.data_ptr() for p in path.parameters()} <= source_pointers
    assert unique_parameters(path) < sum(unique_parameters(m) for m in sources)
    cached = path.generate(**batch, max_new_tokens=8, do_sample=False)
    recomputed = path.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)  # a block run twice keeps two KV caches


def test_path_model_saves_each_block_once_and_loads_back(sources, batch, tmp_path):
    hops = [Hop(0, 0, 1.0), Hop(1, 1, 1.3), Hop(0, 0, 0.8), Hop(1, 0, 1.0)]
    path = build_path_model(hops, sources)
    save_path_model(path, tmp_path / "dfs")
    assert json.loads((tmp_path / "dfs" / "config.json").read_text())["num_hidden_layers"] == 3  # (0,0) stored once
    stored = load_model(tmp_path / "dfs")  # evomerge's loader returns the path model
    assert [layer.path_hop.scale for layer in stored.base_model.layers] == [1.0, 1.3, 0.8, 1.0]
    assert torch.equal(stored.generate(**batch, max_new_tokens=6, do_sample=False),
                       path.generate(**batch, max_new_tokens=6, do_sample=False))
    assert unique_parameters(stored) == unique_parameters(path)


def test_models_that_cannot_share_a_path_are_refused(tiny_checkpoints, sources):
    from transformers import MistralForCausalLM

    from tests.conftest import tiny_config

    wider = tiny_config(sources[0].config.vocab_size)
    wider.hidden_size = 64
    with pytest.raises(PathModelError, match="differ in hidden_size"):
        build_path_model([Hop(0, 0, 1.0)], [sources[0], MistralForCausalLM(wider)])
    with pytest.raises(PathModelError, match="empty"):
        build_path_model([], sources)
    with pytest.raises(PathModelError, match="gives .* 3 blocks"):
        recipe_path_model(DFSRecipe(("a", "b"), (3, 2), 1, (1, 0, 0, 0, 0), [[1.0] * 5] * 5), sources)


def _entry(index, score, length, error=None):
    return {"index": index, "recipe_hash": f"h{index}", "error": error, "cached": False,
            "fitness": [score, -length / 10], "metrics": {"path_length": length}}


def test_pareto_front_and_the_chosen_point_within_a_length_limit():
    entries = [_entry(0, 0.5, 4), _entry(1, 0.6, 8), _entry(2, 0.4, 6), _entry(3, 0.2, 2),
               _entry(4, 0.9, 9, error="boom"), _entry(5, 0.6, 7)]
    front = pareto_front(entries)
    assert [e["index"] for e in front] == [5, 0, 3]  # 1 is dominated by 5, 2 by 0; failures never count
    assert choose(front, None)["index"] == 5
    assert choose(front, 4)["index"] == 0
    with pytest.raises(Exception, match="at most search.max_path_length=1"):
        choose(front, 1)
    # paths over the limit do not count: 6 (0.7, 5 blocks) would join the front and be chosen; 4 blocks are allowed
    limited = pareto_front([*entries, _entry(6, 0.7, 5)], max_path_length=4)
    assert [e["index"] for e in limited] == [0, 3] and choose(limited, 4)["index"] == 0


def _search(home: Path, run_dir: Path, *overrides: str) -> None:
    main(["search", "zoo=micro", f"home={home}", f"hydra.run.dir={run_dir}", "progress=false", *overrides])


def _log(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (path / "log.jsonl").read_text().splitlines()]


def test_dfs_search_resumes_exactly_and_reports_the_chosen_path(micro_zoo_home, tmp_path):
    dfs = ["search=dfs_nsga2", "search.popsize=4", "search.repeats=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    _search(micro_zoo_home, full, *dfs, "search.generations=3")
    _search(micro_zoo_home, split, *dfs, "search.generations=1")
    _search(micro_zoo_home, tmp_path / "resumer", *dfs, "search.generations=3", f"resume={split}")
    assert _log(split) == _log(full) and len(_log(full)) >= 10
    assert (split / "chosen_recipe.yaml").read_text() == (full / "chosen_recipe.yaml").read_text()
    report = json.loads((full / "report.json").read_text())
    assert [r["kind"] for r in report["rows"]] == ["source", "source", "dfs"]
    chosen = report["rows"][-1]
    recipe = load_recipe(full / "chosen_recipe.yaml")
    assert chosen["path_length"] == len(recipe.path) and chosen["recipe_hash"] == recipe.hash
    assert all(r["params"] > 0 and r["metrics"]["split"] == "test" for r in report["rows"])
    front = json.loads((full / "pareto.json").read_text())
    assert front and any(e["recipe_hash"] == recipe.hash for e in front)
    assert (full / "pareto.png").stat().st_size > 0

    main(["export", f"run={full}", f"out={tmp_path / 'export'}", "progress=false", f"home={micro_zoo_home}"])
    model = load_model(tmp_path / "export" / "model")
    assert len(model.base_model.layers) == len(recipe.path)
    # the micro zoo's scores are ~0 whatever runs: compare the exported model's logits with the searched path's
    searched = recipe_path_model(recipe, [load_model(path) for path in recipe.models])
    batch = load_tokenizer(recipe.models[0])(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # unrolled with its scales folded in: equal up to RMSNorm's eps (exact when unscaled)
        torch.testing.assert_close(model(**batch).logits, searched(**batch).logits, rtol=1e-3, atol=3e-3)
    main(["eval", f"model={tmp_path / 'export' / 'model'}", "task=toy_two_skill", "zoo=micro",
          f"home={micro_zoo_home}", f"out={tmp_path / 'eval.json'}", "progress=false"])
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["metrics"]["score"] == pytest.approx(chosen["metrics"]["score"])


def test_ps_dfs_puts_the_ps_winner_first_and_reports_both(micro_zoo_home, tmp_path):
    run = tmp_path / "run"
    stages = ["search=ps_dfs", "search.ps.popsize=4", "search.ps.generations=1", "search.dfs.popsize=4",
              "search.dfs.generations=1", "search.dfs.repeats=1"]
    _search(micro_zoo_home, run, *stages)
    recipe = load_recipe(run / "dfs" / "chosen_recipe.yaml")
    assert recipe.models[0] == str(run / "ps" / "merged") and len(recipe.models) == 3
    report = json.loads((run / "report.json").read_text())
    assert [r["kind"] for r in report["rows"]][-2:] == ["best", "ps_dfs"]
    assert report["search"]["kind"] == "ps_dfs" and report["search"]["ps"]["kind"] == "ps"
    before = _log(run / "dfs")
    _search(micro_zoo_home, tmp_path / "again", *stages, f"resume={run}")  # both stages done: nothing reruns
    assert _log(run / "dfs") == before


def test_dfs_search_under_a_length_limit_keeps_allowed_paths_and_resumes_exactly(micro_zoo_home, tmp_path):
    """search.max_path_length constrains the search itself: with objectives rewarding long paths, the final
    population (rebuilt from the checkpoint by replay, as a resume rebuilds it) keeps paths within the limit over
    longer ones; a run split and resumed writes the same log."""
    dfs = ["search=dfs_nsga2", "search.popsize=4", "search.repeats=2", "search.objectives=[score,path_fraction]",
           "search.max_path_length=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    _search(micro_zoo_home, full, *dfs, "search.generations=4")
    _search(micro_zoo_home, split, *dfs, "search.generations=2")
    _search(micro_zoo_home, tmp_path / "resumer", *dfs, "search.generations=4", f"resume={split}")
    assert _log(split) == _log(full) and len(_log(full)) >= 12
    assert len(load_recipe(full / "chosen_recipe.yaml").path) <= 2

    cfg = OmegaConf.load(full / "config.yaml")
    problem, make_optimizer = make_problem(cfg, resolve_pool(cfg))
    optimizer = make_optimizer()
    for told in json.loads((full / "checkpoint.json").read_text())["history"]:
        optimizer.tell(optimizer.ask(), told["fitness"])
    told = [np.asarray(entry["genome"]) for entry in _log(full)]
    length = lambda genome: len(problem.decode(genome).path)  # noqa: E731
    assert any(length(g) > 2 for g in told)  # longer paths were tried (and rewarded)
    assert _feasible_first(_survivors(optimizer), told, length, 2)


def test_ps_dfs_merges_a_changed_ps_winner_and_refuses_a_dfs_stage_over_the_old_one(micro_zoo_home, tmp_path, capsys):
    """A resumed PS stage with a new winner: `ps/merged` must not keep the old one, nor may the DFS stage that
    searched paths over the old merge continue over the new; once that stage is moved away, the winner is merged
    and DFS searches afresh."""
    run, merged = tmp_path / "run", tmp_path / "run" / "ps" / "merged"
    stages = ["search=ps_dfs", "search.ps.popsize=4", "search.ps.generations=1", "search.dfs.popsize=4",
              "search.dfs.generations=1", "search.dfs.repeats=1"]
    _search(micro_zoo_home, run, *stages)
    weights = (merged / "model.safetensors").read_bytes()
    _search(micro_zoo_home, tmp_path / "same", *stages, f"resume={run}")  # the same winner: its merge is kept
    assert (merged / "model.safetensors").read_bytes() == weights
    # The micro zoo scores every PS candidate 0, so a longer PS budget never changes its winner: stand in another.
    data = yaml.safe_load((run / "ps" / "best_recipe.yaml").read_text())
    data["groups"][0]["weight"][0] = 0.5
    winner = PSRecipe.from_dict(data)
    winner.save(run / "ps" / "best_recipe.yaml")
    dfs_log = _log(run / "dfs")
    with pytest.raises(SystemExit):
        _search(micro_zoo_home, tmp_path / "refused", *stages, "search.ps.generations=2", f"resume={run}")
    error = capsys.readouterr().err
    assert "the PS winner changed" in error and f"move {run / 'dfs'} away" in error
    assert (merged / "model.safetensors").read_bytes() == weights and _log(run / "dfs") == dfs_log

    (run / "dfs").rename(tmp_path / "old_dfs")
    _search(micro_zoo_home, tmp_path / "again", *stages, "search.ps.generations=2", f"resume={run}")
    assert PSRecipe.load(merged / "evomerge_recipe.yaml").hash == winner.hash
    assert (merged / "model.safetensors").read_bytes() != weights
    assert len(_log(run / "dfs")) == 4 and load_recipe(run / "dfs" / "chosen_recipe.yaml").models[0] == str(merged)
