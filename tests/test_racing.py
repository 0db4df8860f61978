"""fitness=racing (evomerge/search/racing.py): rounds, intervals, the stopping rule, and raced searches that are
deterministic, confirm their best on every row and resume exactly -- on a synthetic problem whose candidates have a
known 0/1 outcome on every row of a composite task (the real toy_two_skill task objects pool and combine them),
and on the micro zoo through the real evaluator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from evomerge.eval.evaluator import RowScores
from evomerge.eval.task import SampleScore, load_task
from evomerge.search.optimizer import CMAES
from evomerge.search.racing import Entrant, Race, RacingSchedule, row_order
from evomerge.search.run import Budget, SerialExecutor, load_checkpoint, run_search
from tests.helpers.synthetic_search import VectorRecipe

SIZES = {"toy_ja_qa": 200, "toy_en_math": 120}
SCHEDULE = RacingSchedule(schedule="racing", first_rows=16)
TASK = load_task("toy_two_skill", {"zoo_dir": "/nonexistent"})  # the task's objects only: no split is read
PLAIN = {c.task.name: c.task for c in TASK.components}


class RowProblem:
    """Row j of a task is right when its fixed difficulty u_j is below the candidate's skill on that task, a smooth
    function of the genome peaking at 0.3: full-split rates are known exactly, and rows separate candidates."""

    objectives = ("score",)

    def __init__(self):
        rng = np.random.default_rng(7)
        self.difficulty = {name: rng.random(size) for name, size in SIZES.items()}
        self.answers = 0  # rows generated, over the problem's life

    def decode(self, genome) -> VectorRecipe:
        return VectorRecipe(tuple(round(float(v), 6) for v in genome))

    def load(self) -> None:
        pass

    def report_row(self, item):
        raise NotImplementedError

    def skill(self, recipe: VectorRecipe, name: str) -> float:
        x = np.asarray(recipe.values)
        centre = 0.3 if name == "toy_ja_qa" else 0.6
        return float(np.clip(1.0 - 8 * np.mean((x - centre) ** 2), 0, 1))

    def _scored(self, recipe: VectorRecipe, name: str, rows) -> RowScores:
        self.answers += len(rows)
        right = self.difficulty[name][np.asarray(rows)] < self.skill(recipe, name)
        return RowScores(tuple(SampleScore(None, bool(r), 1.0) for r in right), (3,) * len(rows))

    def evaluate_rows(self, recipe: VectorRecipe, rows):
        return {name: self._scored(recipe, name, indices) for name, indices in rows.items()}, {"merge": 0.0, "eval": 0.0}

    def evaluate(self, recipe: VectorRecipe):
        full = {name: PLAIN[name].metrics(self._scored(recipe, name, range(size)).scores, "search", 3 * size)
                for name, size in SIZES.items()}
        return TASK.combine(full, "search"), {"merge": 0.0, "eval": 0.0}


def race(parents: int = 5, **settings) -> Race:
    schedule = SCHEDULE.model_copy(update=settings)
    return Race(schedule, TASK, ("score",), SIZES, seed=0, parents=parents)


def test_rounds_grow_to_the_whole_split_and_cover_each_row_once():
    rounds = race().rounds()
    assert [r["toy_ja_qa"] for r in rounds] == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 200)]
    assert [r["toy_en_math"] for r in rounds] == [(0, 16), (16, 32), (32, 64), (64, 120), (120, 120)]
    order = race().order["toy_ja_qa"]
    assert sorted(order) == list(range(200)) and not np.array_equal(order, np.arange(200))
    assert np.array_equal(order, row_order("toy_ja_qa", 200, 0))
    assert not np.array_equal(order, row_order("toy_ja_qa", 200, 1))  # another search seed, another order


def entrant(problem: RowProblem, recipe: VectorRecipe, racer: Race, rows: int) -> Entrant:
    scored, _ = problem.evaluate_rows(recipe, {name: racer.order[name][:rows].tolist() for name in SIZES})
    return Entrant({name: list(r.scores) for name, r in scored.items()}, {name: list(r.tokens) for name, r in scored.items()})


def test_differences_are_agresti_min_per_task_narrowed_by_the_finite_population_and_exact_on_every_row():
    problem, racer = RowProblem(), race()
    mine, theirs = problem.decode([0.4, 0.5]), problem.decode([0.35, 0.45])
    a, b = entrant(problem, mine, racer, 40), entrant(problem, theirs, racer, 40)
    estimate, low, high = racer.difference(a, b)
    centre = half = 0.0
    for name, size in SIZES.items():
        x = np.array([s.correct for s in a.scores[name]])
        y = np.array([s.correct for s in b.scores[name]])
        n12, n21 = np.sum(x & ~y) + 0.5, np.sum(~x & y) + 0.5
        d, cells = (n12 - n21) / 42, 42
        var = ((n12 + n21) / cells - d ** 2) / cells
        centre += d / 2
        half += 1.959964 * np.sqrt(var) * np.sqrt((size - 40) / (size - 1)) / 2
    assert estimate == pytest.approx(racer.estimate(a) - racer.estimate(b))
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-5)
    whole_a, whole_b = entrant(problem, mine, racer, 200), entrant(problem, theirs, racer, 200)
    exact = problem.evaluate(mine)[0]["score"] - problem.evaluate(theirs)[0]["score"]
    assert racer.difference(whole_a, whole_b) == pytest.approx((exact, exact, exact))
    # against a value alone (a repeat): Wilson per task, exact on every row
    value = racer.difference(whole_a, Entrant(value=0.25))
    assert value == pytest.approx((problem.evaluate(mine)[0]["score"] - 0.25,) * 3)
    _, low, high = racer.difference(a, Entrant(value=0.25))
    assert low < racer.estimate(a) - 0.25 < high


def test_row_by_row_differences_decide_sooner_than_separate_accuracies():
    """Two close candidates get most rows alike: their paired interval is far narrower than the unpaired one."""
    problem, racer = RowProblem(), race()
    a = entrant(problem, problem.decode([0.3, 0.3]), racer, 64)
    b = entrant(problem, problem.decode([0.38, 0.3]), racer, 64)
    _, low, high = racer.difference(a, b)
    separate = [racer.difference(x, Entrant(value=0.0)) for x in (a, b)]  # each rate's own interval
    assert high < 0  # b is better: decided on 64 rows per task
    assert high - low < 0.6 * sum(high_x - low_x for _, low_x, high_x in separate)


def stratified(outcomes: np.ndarray, layout) -> float:
    """By hand: the mean of each stratum's rows read, weighted by the stratum's share of the split."""
    labels = layout.stratum[layout.order[:len(outcomes)]]
    return sum(np.mean(outcomes[labels == h]) * np.mean(layout.stratum == h) for h in np.unique(layout.stratum))


def test_informative_rows_read_contested_rows_first_with_stratified_estimates_and_intervals():
    problem, racer = RowProblem(), race(rows="informative")
    recipes = generation()
    first = racer.run(SerialExecutor(problem), recipes)  # nothing learnt yet: the seeded order, one stratum
    assert all(np.array_equal(racer.order[name], row_order(name, size, 0)) for name, size in SIZES.items())
    older = [{"generation": 0, "row_outcomes": {key: "01" * (len(marks) // 2) for key, marks in o.row_outcomes.items()}}
             for o in first]  # an older generation: not what the next one resembles, so not learnt from
    racer.learn([*older, *({"generation": 1, "row_outcomes": outcome.row_outcomes} for outcome in first)])
    layout = racer.layouts["toy_ja_qa"]
    marks = np.array([list(outcome.row_outcomes["toy_ja_qa/acc_ja"]) for outcome in first])
    seen, right = (marks != "-").sum(0), (marks == "1").sum(0)
    contested = (seen >= 2) & (right > 0) & (right < seen)
    assert sorted(layout.order) == list(range(200)) and len(np.unique(layout.stratum)) >= 2
    assert np.unique(layout.stratum[contested]).size == 1  # the contested rows are one stratum, and only they
    assert not np.any(layout.stratum[~contested] == layout.stratum[contested][0])
    settled, head = (seen >= 2) & ~contested, np.isin(np.arange(200), layout.order[:48])
    assert head[contested].mean() > 2 * head[settled].mean()  # contested rows are read first, settled ones last

    mine, theirs = generation(seed=5, size=2)
    a, b = entrant(problem, mine, racer, 40), entrant(problem, theirs, racer, 40)
    by_hand = {name: stratified(np.array([s.correct for s in a.scores[name]]), racer.layouts[name]) for name in SIZES}
    assert racer.estimate(a) == pytest.approx(np.mean(list(by_hand.values())))
    estimate, low, high = racer.difference(a, b)
    centre = half = 0.0
    for name, size in SIZES.items():
        layout = racer.layouts[name]
        x, y = (np.array([s.correct for s in e.scores[name]]) for e in (a, b))
        labels, variance = layout.stratum[layout.order[:40]], 0.0
        for h in np.unique(layout.stratum):
            share, stratum_size, n = np.mean(layout.stratum == h), np.sum(layout.stratum == h), np.sum(labels == h)
            n12, n21 = np.sum(x[labels == h] & ~y[labels == h]) + 0.5, np.sum(~x[labels == h] & y[labels == h]) + 0.5
            d = (n12 - n21) / (n + 2)
            centre += share * d / 2
            variance += share ** 2 * ((n12 + n21) / (n + 2) - d ** 2) / (n + 2) * (stratum_size - n) / (stratum_size - 1)
        half += 1.959964 * np.sqrt(variance) / 2
    assert estimate == pytest.approx(racer.estimate(a) - racer.estimate(b))
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-5)
    whole_a, whole_b = entrant(problem, mine, racer, 200), entrant(problem, theirs, racer, 200)
    exact = problem.evaluate(mine)[0]["score"] - problem.evaluate(theirs)[0]["score"]
    assert racer.estimate(whole_a) == pytest.approx(problem.evaluate(mine)[0]["score"])
    assert racer.difference(whole_a, whole_b) == pytest.approx((exact, exact, exact))


def generation(seed: int = 1, size: int = 10) -> list[VectorRecipe]:
    rng = np.random.default_rng(seed)
    return [VectorRecipe(tuple(np.round(rng.random(3), 6))) for _ in range(size)]


def test_a_race_stops_hopeless_candidates_early_and_scores_the_leader_on_every_row():
    problem = RowProblem()
    recipes = generation()
    outcomes = race().run(SerialExecutor(problem), recipes)
    full = [problem.evaluate(recipe)[0] for recipe in recipes]
    leader = int(np.argmax([m["score"] for m in full]))
    assert outcomes[leader].confirmed and outcomes[leader].metrics == full[leader]
    assert outcomes[leader].row_outcomes["toy_ja_qa/acc_ja"] == "".join(
        "1" if d < problem.skill(recipes[leader], "toy_ja_qa") else "0" for d in problem.difficulty["toy_ja_qa"])
    assert outcomes[leader].fitness == (full[leader]["score"],)
    rows = [o.metrics["n"] for o in outcomes]
    worst = int(np.argmin([m["score"] for m in full]))
    assert rows[worst] == 32 and not outcomes[worst].confirmed  # out after the first round (16 rows per task)
    assert sum(rows) < 0.6 * len(recipes) * sum(SIZES.values())
    for outcome, truth in zip(outcomes, full):  # an estimate is the plain rate on the rows scored
        assert outcome.confirmed == (outcome.metrics["n"] == truth["n"])
        assert outcome.metrics["tokens"] == 3 * outcome.metrics["n"]


def test_a_candidate_that_could_beat_the_incumbent_is_raced_to_the_end():
    problem = RowProblem()
    recipes = generation()
    full = [problem.evaluate(recipe)[0]["score"] for recipe in recipes]
    below_all = race().run(SerialExecutor(problem), recipes, incumbent={"fitness": [min(full) - 0.5]})
    above_all = race().run(SerialExecutor(problem), recipes, incumbent={"fitness": [1.0]})
    leader = int(np.argmax(full))
    assert all(o.confirmed for o in below_all)  # every candidate may be the new best: all scored on every row
    assert not above_all[leader].confirmed  # none can be: the leader stops once it is surely among the parents
    assert sum(o.metrics["n"] for o in above_all) < 0.5 * sum(o.metrics["n"] for o in below_all)


def test_the_indifference_zone_stops_candidates_next_to_the_selection_boundary():
    problem = RowProblem()
    recipes = generation(size=10)
    strict = race(indifference=0.0).run(SerialExecutor(problem), recipes, incumbent={"fitness": [1.0]})
    lenient = race(indifference=0.5).run(SerialExecutor(problem), recipes, incumbent={"fitness": [1.0]})
    assert sum(o.metrics["n"] for o in lenient) < sum(o.metrics["n"] for o in strict)


def test_a_failing_candidate_is_logged_failed_and_the_race_goes_on():
    class FailsLater(RowProblem):
        def evaluate_rows(self, recipe, rows):
            if recipe == recipes[leader] and min(map(min, rows.values())) > 0:  # the leader fails in its second round
                raise FloatingPointError("non-finite logits")
            return super().evaluate_rows(recipe, rows)

    recipes = generation()
    leader = int(np.argmax([RowProblem().evaluate(recipe)[0]["score"] for recipe in recipes]))
    outcomes = race().run(SerialExecutor(FailsLater()), recipes)
    assert "non-finite logits" in outcomes[leader].error and outcomes[leader].metrics == {}
    assert not outcomes[leader].confirmed
    assert all(o.error is None for i, o in enumerate(outcomes) if i != leader)
    assert any(o.confirmed for o in outcomes)  # with the leader out, the next best is raced to the end


def raced_search(run_dir: Path, generations: int, problem: RowProblem | None = None, racing: bool = True,
                 rows: str = "random"):
    problem = problem or RowProblem()
    return run_search(run_dir, problem, lambda: CMAES(3, seed=2, popsize=8), {"problem": "rows"}, Budget(generations),
                      race=race(parents=4, rows=rows) if racing else None, progress=False)


def log(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rows", ["random", "informative"])
def test_a_raced_search_is_deterministic_costs_fewer_rows_and_its_best_is_confirmed(tmp_path, rows):
    raced, full = RowProblem(), RowProblem()
    result = raced_search(tmp_path / "a", 8, raced, rows=rows)
    raced_search(tmp_path / "b", 8, rows=rows)
    reference = raced_search(tmp_path / "full", 8, full, racing=False)
    assert log(tmp_path / "a") == log(tmp_path / "b")
    history = load_checkpoint(tmp_path / "a")["history"]
    assert sum(told["answers"] for told in history) == raced.answers  # every generated row is counted
    assert result.best["confirmed"] and result.best["metrics"]["n"] == sum(SIZES.values())
    recipe = raced.decode(np.asarray(result.best["genome"]))
    assert result.best["fitness"][0] == raced.evaluate(recipe)[0]["score"]
    assert any(not e["confirmed"] for e in result.entries)
    assert all(e["fitness"][0] <= result.best["fitness"][0] for e in result.entries if e["confirmed"])
    assert [len(told["confirmed"]) for told in history] == [8] * 8
    assert raced.answers < 0.75 * full.answers
    fresh = [e for e in result.entries if not e["cached"]]
    assert all(set(e["row_outcomes"]) == {"toy_ja_qa/acc_ja", "toy_en_math/acc"} for e in fresh)
    assert all(("-" in e["row_outcomes"]["toy_ja_qa/acc_ja"]) != e["confirmed"] for e in fresh)
    assert all(e["confirmed"] for e in reference.entries) and "confirmed" not in load_checkpoint(tmp_path / "full")[
        "history"][0]


@pytest.mark.parametrize("rows", ["random", "informative"])
def test_a_raced_search_resumed_after_a_kill_mid_generation_gives_the_uninterrupted_run(tmp_path, rows):
    raced_search(tmp_path / "whole", 6, rows=rows)
    raced_search(tmp_path / "cut", 3, rows=rows)
    whole = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    # a kill in generation 4: three of its lines (and half a fourth) were logged after the last checkpoint
    with open(tmp_path / "cut" / "log.jsonl", "a") as handle:
        handle.write("\n".join(whole[24:27]) + "\n" + whole[27][:40])
    partial = shutil.copytree(tmp_path / "cut", tmp_path / "partial")
    raced_search(partial, 6, rows=rows)
    assert log(partial) == log(tmp_path / "whole")
    # killed after the whole generation was logged, before its checkpoint: its lines are reused as they are
    complete = shutil.copytree(tmp_path / "cut", tmp_path / "complete", dirs_exist_ok=False)
    (complete / "log.jsonl").write_text("\n".join(whole[:32]) + "\n")
    problem = RowProblem()
    raced_search(complete, 6, problem, rows=rows)
    assert log(complete) == log(tmp_path / "whole")
    assert problem.answers == sum(t["answers"] for t in load_checkpoint(tmp_path / "whole")["history"][4:])


def test_evaluate_rows_pooled_over_slices_equals_the_whole_split(micro_zoo_home):
    """The real evaluator on the micro zoo: a task scored slice by slice, pooled, gives the whole split's metrics."""
    from hydra import compose, initialize_config_module

    from evomerge.pool import resolve_pool
    from evomerge.resources import CONF_MODULE
    from evomerge.search.ps import make_problem

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "zoo=micro", f"home={micro_zoo_home}", "progress=false"])
    problem, _ = make_problem(cfg, resolve_pool(cfg))
    recipe = problem.decode(problem.space.encode({"weight": 1.0}))
    whole, _ = problem.evaluate(recipe)
    order = {p.task.name: row_order(p.task.name, len(p.prompts), 0) for p in problem.evaluator.prepared}
    scores: dict[str, list] = {name: [None] * len(rows) for name, rows in order.items()}
    for start, stop in [(0, 3), (3, 8)]:
        sliced, _ = problem.evaluate_rows(recipe, {name: rows[start:stop].tolist() for name, rows in order.items()})
        for name, scored in sliced.items():
            for index, score in zip(order[name][start:stop], scored.scores):
                scores[name][index] = score
    whole_rows = {name: rows.tolist() for name, rows in order.items()}
    tokens = {name: sum(scored.tokens) for name, scored in problem.evaluate_rows(recipe, whole_rows)[0].items()}
    pooled = problem.task.combine({name: PLAIN[name].metrics(s, "search", tokens[name]) for name, s in scores.items()},
                                  "search")
    assert pooled == whole


def test_evomerge_search_fitness_racing_on_the_micro_zoo_resumes_and_refuses_another_schedule(micro_zoo_home, tmp_path,
                                                                                             capsys):
    from evomerge.cli import main

    def search(run_dir: Path, *overrides: str) -> None:
        main(["search", "zoo=micro", f"home={micro_zoo_home}", f"hydra.run.dir={run_dir}", "progress=false",
              "search.popsize=4", "fitness=racing", "fitness.first_rows=2", *overrides])

    search(tmp_path / "whole", "search.generations=2")
    search(tmp_path / "split", "search.generations=1")
    search(tmp_path / "resumed", "search.generations=2", f"resume={tmp_path / 'split'}")
    assert log(tmp_path / "split") == log(tmp_path / "whole") and len(log(tmp_path / "whole")) == 8
    history = load_checkpoint(tmp_path / "whole")["history"]
    assert all(len(told["confirmed"]) == 4 and told["answers"] > 0 for told in history)
    assert json.loads((tmp_path / "whole" / "report.json").read_text())["paired"]
    assert (tmp_path / "whole" / "fitness.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["search", "zoo=micro", f"home={micro_zoo_home}", f"hydra.run.dir={tmp_path / 'other'}", "progress=false",
              "search.popsize=4", "search.generations=3", f"resume={tmp_path / 'whole'}"])
    assert "setting fitness was" in capsys.readouterr().err
