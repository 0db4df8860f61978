"""Paired statistics of a held-out report: per-row values that average to the objective, and the difference,
bootstrap interval and McNemar p-value checked against values computed by hand."""

from __future__ import annotations

import math

import pytest

from evomerge.eval.significance import paired_comparison, row_values
from evomerge.eval.task import load_task


def samples(task: str, correct: list[int], correct_ja: list[int] | None = None) -> list[dict]:
    ja = correct_ja if correct_ja is not None else correct
    return [{"task": task, "correct": bool(c), "correct_ja": bool(j)} for c, j in zip(correct, ja)]


def test_row_values_average_to_the_objective_of_a_plain_and_a_composite_task(tmp_path):
    mgsm = load_task("mgsm_ja", {})
    rows = samples("mgsm_ja", [1, 1, 0, 1], [1, 0, 0, 1])
    values, outcomes = row_values(mgsm, rows, "score")  # mgsm_ja's score is acc_ja
    assert outcomes == [True, False, False, True] and sum(values) / len(values) == 0.5
    assert row_values(mgsm, rows, "acc")[1] == [True, True, False, True]

    two_skill = load_task("toy_two_skill", {"zoo_dir": str(tmp_path)})
    names = [c.task.name for c in two_skill.components]
    first = samples(names[0], [1, 1, 1, 0])  # component score 0.75 on 4 rows
    second = samples(names[1], [1, 0])  # component score 0.5 on 2 rows
    values, outcomes = row_values(two_skill, first + second, "score")
    assert math.isclose(sum(values) / len(values), (0.75 + 0.5) / 2)  # the composite score: the components' mean
    assert outcomes == [True, True, True, False, True, False]
    assert row_values(two_skill, first + second, f"{names[1]}/score")[0] == [1.0, 0.0]  # that component's rows


def test_paired_comparison_matches_hand_computed_statistics():
    a = [1] * 30 + [0] * 10 + [1] * 5 + [0] * 5  # 50 rows: right on 35
    b = [1] * 30 + [1] * 2 + [0] * 8 + [0] * 5 + [0] * 5  # right on 32; a alone on 5 rows, b alone on 2
    result = paired_comparison(a, [bool(x) for x in a], b, [bool(x) for x in b])
    assert result["difference"] == pytest.approx((35 - 32) / 50)
    assert (result["better"], result["worse"], result["n"]) == (5, 2, 50)
    exact = sum(math.comb(7, k) for k in (0, 1, 2, 5, 6, 7)) / 2**7  # two-sided binomial test, 5 of 7 discordant
    assert result["mcnemar_p"] == pytest.approx(exact, rel=1e-3)
    low, high = result["ci95"]
    assert low < result["difference"] < high and low > -0.1 and high < 0.2  # +-2 SE of the paired mean ~ +-0.07
    assert paired_comparison(a, [bool(x) for x in a], b, [bool(x) for x in b]) == result  # seeded: the same again


def test_identical_models_differ_by_zero_with_p_one():
    rows = [1, 0, 1, 1]
    result = paired_comparison(rows, [bool(x) for x in rows], rows, [bool(x) for x in rows])
    assert result["difference"] == 0 and result["ci95"] == [0.0, 0.0] and result["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same rows"):
        paired_comparison(rows, rows, rows[:3], rows[:3])
