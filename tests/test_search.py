"""The PS search: genome decoding, optimizer determinism, the shared run loop's exact resume, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.errors import MergeError
from evomerge.recipe import PSRecipe
from evomerge.search.genome import PSGenomeSpace
from evomerge.search.optimizer import CMAES
from evomerge.search.run import SearchError, check_settings, load_checkpoint
from tests.helpers.synthetic_search import SAFE_LIMIT

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("embed", "blocks.0-1", "blocks.2-3", "head")


def space(**changes) -> PSGenomeSpace:
    settings = dict(method="ties", base="/m/base", models=("/m/a", "/m/b"), groups=GROUPS,
                    parameters={"lambda": 1.0}, ranges={"weight": (0.0, 2.0), "density": (0.2, 1.0)})
    return PSGenomeSpace(**(settings | changes))


def test_genome_decodes_coordinates_group_by_group_model_by_model():
    s = space()
    assert s.dim == 4 * 2 * 2 and s.describe()[:4] == ["embed/weight/0", "embed/weight/1", "embed/density/0", "embed/density/1"]
    genome = np.zeros(s.dim)
    genome[2] = 1.0  # embed density of model 0 -> top of its range
    genome[4] = 0.25  # blocks.0-1 weight of model 0 -> 0.5
    recipe = s.decode(genome)
    assert recipe.groups[0]["density"] == (1.0, 0.2) and recipe.groups[0]["weight"] == (0.0, 0.0)
    assert recipe.groups[1]["weight"] == (0.5, 0.0)
    assert [g.name for g in recipe.groups] == list(GROUPS)


def test_genome_outside_the_box_is_clipped_and_recipes_round_trip():
    s = space()
    recipe = s.decode(np.linspace(-1, 2, s.dim))
    assert all(0.2 <= d <= 1.0 for g in recipe.groups for d in g["density"])
    assert PSRecipe.from_yaml(recipe.to_yaml()) == recipe and PSRecipe.from_yaml(recipe.to_yaml()).hash == recipe.hash


def test_shared_genome_sets_every_group_alike():
    s = space(shared=True)
    assert s.dim == 4 and s.describe()[0] == "all/weight/0"
    recipe = s.decode(np.array([0.5, 0.25, 1.0, 0.0]))
    assert len({(g["weight"], g["density"]) for g in recipe.groups}) == 1 and len(recipe.groups) == 4


def test_weights_only_methods_have_no_density_coordinates():
    assert space(method="task_arithmetic").dim == 4 * 2


def test_bad_ranges_are_named():
    with pytest.raises(MergeError, match="density"):
        space(ranges={"weight": (0.0, 1.0), "density": (0.0, 1.0)})
    with pytest.raises(MergeError, match="unknown merge method 'tie'"):
        space(method="tie")


def test_cmaes_is_deterministic_and_independent_of_global_numpy_state():
    first, second = CMAES(5, seed=1, popsize=6), CMAES(5, seed=1, popsize=6)
    np.random.seed(123)
    a = first.ask()
    np.random.rand(1000)
    b = second.ask()
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and all(((0 <= x) & (x <= 1)).all() for x in a)
    first.tell(a, [[-float(np.sum(x ** 2))] for x in a])
    second.tell(b, [[-float(np.sum(x ** 2))] for x in b])
    assert all(np.array_equal(x, y) for x, y in zip(first.ask(), second.ask()))


def test_settings_mismatch_names_the_setting():
    with pytest.raises(SearchError, match=r"search.popsize was 8 in the checkpoint, is 10 now"):
        check_settings({"search": {"popsize": 8, "seed": 0}}, {"search": {"popsize": 10, "seed": 0}})


def _synthetic(run_dir: Path, generations: int, kill_at: int | None = None) -> int:
    args = [sys.executable, "-m", "tests.helpers.synthetic_search", str(run_dir), str(generations)]
    if kill_at is not None:
        args.append(str(kill_at))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert _synthetic(run_dir, 5) == 0
    return run_dir


@pytest.mark.parametrize("kill_at", [12, 15], ids=["between-generations", "mid-generation"])
def test_sigkill_then_resume_gives_the_uninterrupted_log_and_best(tmp_path, uninterrupted, kill_at):
    assert _synthetic(tmp_path, 5, kill_at) == -9  # SIGKILL, at the kill_at-th evaluation (popsize 6)
    assert load_checkpoint(tmp_path)["generation"] == kill_at // 6
    assert _synthetic(tmp_path, 5) == 0
    assert (tmp_path / "log.jsonl").read_text() == (uninterrupted / "log.jsonl").read_text()
    assert (tmp_path / "best_recipe.yaml").read_text() == (uninterrupted / "best_recipe.yaml").read_text()
    assert load_checkpoint(tmp_path)["best"] == load_checkpoint(uninterrupted)["best"]


def test_failing_candidates_are_logged_and_scored_worst(uninterrupted):
    entries = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert len(entries) == 30 and [e["index"] for e in entries] == list(range(30))
    failed = [e for e in entries if e["error"]]
    assert 0 < len(failed) < len(entries) / 2  # some fail, and the search goes on
    assert all(e["fitness"] == [-1.0] and "safe region" in e["error"] and e["genome"][0] > SAFE_LIMIT for e in failed)
    assert all(e["genome"][0] <= SAFE_LIMIT and e["fitness"][0] > -1.0 for e in entries if not e["error"])


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    assert _synthetic(tmp_path, 3) == 0
    (tmp_path / "checkpoint.json").write_text('{"format": "evomerge-checkpoint", "version": 1, "checksum": "x", "generation": 9}')
    assert load_checkpoint(tmp_path)["generation"] == 2


def _search(home: Path, run_dir: Path, *overrides: str) -> None:
    main(["search", "zoo=micro", f"home={home}", f"hydra.run.dir={run_dir}", "progress=false",
          "search.popsize=4", *overrides])


def test_ps_search_on_the_micro_zoo_resumes_and_reports(micro_zoo_home, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    _search(micro_zoo_home, full, "search.generations=2")
    _search(micro_zoo_home, split, "search.generations=1")
    _search(micro_zoo_home, tmp_path / "resumer", "search.generations=2", f"resume={split}")
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "seconds"}  # noqa: E731
                          for l in (path / "log.jsonl").read_text().splitlines()]
    assert strip(split) == strip(full) and len(strip(full)) == 8
    assert (split / "best_recipe.yaml").read_text() == (full / "best_recipe.yaml").read_text()
    report = json.loads((full / "report.json").read_text())
    assert report["split"] == "test" and {r["kind"] for r in report["rows"]} == {"source", "baseline", "best"}
    assert all(0 <= r["metrics"]["fitness"] <= 1 and r["metrics"]["split"] == "test" for r in report["rows"])
    fitness = {row["name"]: row["metrics"]["fitness"] for row in report["rows"]}  # the best against each other row
    assert [(p["model"], p["against"]) for p in report["paired"]] == [("best (search)", name) for name in list(fitness)[:-1]]
    for paired in report["paired"]:  # the paired mean difference is the difference of the two fitnesses
        assert paired["difference"] == pytest.approx(fitness["best (search)"] - fitness[paired["against"]], abs=1e-4)
        assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1] and 0 <= paired["mcnemar_p"] <= 1
    assert all("per_row" not in row for row in report["rows"])
    assert (full / "fitness.png").stat().st_size > 0
    recipe = PSRecipe.load(full / "best_recipe.yaml")
    assert recipe.method == "task_arithmetic" and recipe.group_names == ("embed", "blocks.0", "blocks.1", "head")


def test_resume_with_a_different_setting_is_refused(micro_zoo_home, tmp_path, capsys):
    _search(micro_zoo_home, tmp_path / "a", "search.generations=1")
    with pytest.raises(SystemExit) as exit_info:
        _search(micro_zoo_home, tmp_path / "b", "search.generations=2", "search.sigma0=0.3", f"resume={tmp_path / 'a'}")
    assert exit_info.value.code == 1
    assert "setting search.sigma0 was 0.1667 in the checkpoint, is 0.3 now" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run_is_refused(micro_zoo_home, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _search(micro_zoo_home, tmp_path / "b", f"resume={tmp_path}")
    assert "not a search run directory" in capsys.readouterr().err


def test_encode_is_the_inverse_of_decode_for_uniform_values():
    s = space(shared=False)
    recipe = s.decode(s.encode({"weight": 1.0, "density": 0.6}))
    assert all(g["weight"] == (1.0, 1.0) and g["density"] == (0.6, 0.6) for g in recipe.groups)
    assert (s.encode({"weight": 5.0, "density": 0.6}) <= 1.0).all()  # clipped into the box


def test_evaluation_budget_stops_between_generations(tmp_path):
    args = [sys.executable, "-m", "tests.helpers.synthetic_search", str(tmp_path), "5", "-", "10"]
    assert subprocess.run(args, cwd=ROOT, capture_output=True).returncode == 0
    state = load_checkpoint(tmp_path)
    assert state["generation"] == 2 and state["evaluations"] == 12  # popsize 6: 6 < 10, then 12 >= 10


def test_unknown_start_is_named(micro_zoo_home, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _search(micro_zoo_home, tmp_path / "b", "search.start=centre")
    assert "search.start='centre'" in capsys.readouterr().err
