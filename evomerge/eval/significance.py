"""Is a searched merge better than a baseline beyond noise? Paired statistics over the rows of one test split.

Two models scored on the same rows are compared row by row: the difference of their objective with a paired
bootstrap 95% interval (rows resampled jointly, `scipy.stats.bootstrap`), and McNemar's exact test on the rows one
model got right and the other wrong (a two-sided binomial test on the discordant rows, `scipy.stats.binomtest`).
The objective's per-row values average to the objective itself: a plain task's rows carry 0/1 for its metric; a
composite task's `score` (the mean of its components' metrics) weighs each row by 1 / (components x that
component's rows), so every component counts as much as in the score.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from evomerge.eval.harness import HarnessTask
from evomerge.eval.task import OUTCOMES, AnyTask, CompositeTask

CONFIDENCE = 0.95
RESAMPLES = 10_000


def _field(metric: str) -> str:
    if metric not in OUTCOMES:
        raise ValueError(f"no per-row outcome averages to metric {metric!r}; paired statistics cover "
                         f"{sorted(OUTCOMES)} and the score built from them")
    return OUTCOMES[metric]


def row_values(task: AnyTask | HarnessTask, samples: Sequence[Mapping[str, Any]],
               objective: str) -> tuple[list[float], list[bool]]:
    """Per test row: its value in `objective` (they average to the objective) and its 0/1 outcome."""
    if isinstance(task, HarnessTask):  # lm-eval's per-row metrics; `score` is the mean of the tasks' fitness
        values, outcomes = task.row_values(samples, objective)
        if objective == "score":
            values = task_weighted(values, [sample["task"] for sample in samples])
        return values, outcomes
    if isinstance(task, CompositeTask):
        if "/" in objective:  # one component's metric: that component's rows
            name, metric = objective.split("/", 1)
            plain = next(c.task for c in task.components if c.task.name == name)
            metric = plain.primary_metric if metric == "score" else metric
            rows = [sample for sample in samples if sample["task"] == name]
            outcomes = [bool(sample[_field(metric)]) for sample in rows]
            return [float(o) for o in outcomes], outcomes
        if objective != "score":  # pooled over every row
            outcomes = [bool(sample[_field(objective)]) for sample in samples]
            return [float(o) for o in outcomes], outcomes
        fields = {c.task.name: _field(c.task.primary_metric if c.metric == "score" else c.metric) for c in task.components}
        outcomes = [bool(sample[fields[sample["task"]]]) for sample in samples]
        return task_weighted([float(o) for o in outcomes], [sample["task"] for sample in samples]), outcomes
    outcomes = [bool(sample[_field(task.primary_metric if objective == "score" else objective)]) for sample in samples]
    return [float(o) for o in outcomes], outcomes


def task_weighted(values: Sequence[float], tasks: Sequence[str]) -> list[float]:
    """Each row's value scaled by 1 / (tasks x its task's rows), times the rows: their mean is the mean of the
    per-task means, as a score that averages its tasks weighs them."""
    counts = Counter(tasks)
    scale = len(values) / len(counts)
    return [value * scale / counts[task] for value, task in zip(values, tasks)]


def paired_comparison(values: Sequence[float], outcomes: Sequence[bool], other_values: Sequence[float],
                      other_outcomes: Sequence[bool], seed: int = 0) -> dict[str, Any]:
    """The first model minus the other on the same rows: the difference, its paired bootstrap 95% interval,
    McNemar's exact p-value, and the rows only the first (`better`) or only the other (`worse`) got right."""
    first, second = np.asarray(values, dtype=float), np.asarray(other_values, dtype=float)
    if first.shape != second.shape or len(outcomes) != len(other_outcomes):
        raise ValueError(f"paired statistics need the same rows: {len(first)} and {len(second)}")
    difference = float(np.mean(first - second))
    if np.ptp(first - second) == 0:  # every row differs by the same amount: the interval is that point
        low = high = difference
    else:
        interval = stats.bootstrap((first, second), lambda a, b, axis: np.mean(a - b, axis=axis), paired=True,
                                   confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                                   rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    better = sum(a and not b for a, b in zip(outcomes, other_outcomes))
    worse = sum(b and not a for a, b in zip(outcomes, other_outcomes))
    p_value = stats.binomtest(better, better + worse, 0.5).pvalue if better + worse else 1.0
    return {"difference": round(difference, 4), "ci95": [round(low, 4), round(high, 4)],
            "mcnemar_p": float(f"{p_value:.3g}"), "better": better, "worse": worse, "n": len(first)}
