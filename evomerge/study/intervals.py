"""Bootstrap intervals for the study: every number is resampled over expert subsets and test questions at once.

A cell (base kind, method, N) is a mean over expert subsets of a mean over tasks of score / reference, and every
score is a mean over the same test questions. Its noise has two sources, so each replicate draws both: each N's
subsets with replacement (one draw shared by every kind and method, which merge the same subsets) and each task's
test questions with replacement (one draw shared by every model, which answer the same questions). Ratios and
differences are therefore paired, and a finding's difference is computed replicate by replicate.

`scipy.stats.bootstrap` resamples one level of observations; this is a two-level (cluster) bootstrap, so the index
draws are made here and the interval is the percentile interval of the replicates. Replicate 0 is the identity
draw: the point estimate travels with its replicates through every formula.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
REPLICATES = 2000


class Draws:
    """The index draws: per task, which test questions; per N, which of its subsets. Row 0 is the identity."""

    def __init__(self, questions: Mapping[str, int], subsets: Mapping[int, int], replicates: int = REPLICATES,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        self.replicates = replicates
        self.questions = {task: _with_identity(rng.integers(0, count, size=(replicates, count)))
                          for task, count in sorted(questions.items())}
        self.subsets = {n: _with_identity(rng.integers(0, count, size=(replicates, count)))
                        for n, count in sorted(subsets.items())}

    def score(self, task: str, rows: Sequence[int]) -> np.ndarray:
        """A task's score (mean of its 0/1 rows) in every replicate."""
        rows = np.asarray(rows, dtype=float)
        if len(rows) != self.questions[task].shape[1]:
            raise ValueError(f"{task}: {len(rows)} rows, the draws were made for {self.questions[task].shape[1]}")
        return rows[self.questions[task]].mean(axis=1)

    def over_subsets(self, n: int, values: Sequence[np.ndarray]) -> np.ndarray:
        """The mean over N's resampled subsets of per-subset values (one array per subset, in subset order)."""
        stacked = np.stack(values, axis=1)  # replicate x subset
        if stacked.shape[1] != self.subsets[n].shape[1]:
            raise ValueError(f"N={n}: {stacked.shape[1]} subsets, the draws were made for {self.subsets[n].shape[1]}")
        return _nanmean(np.take_along_axis(stacked, self.subsets[n], axis=1), axis=1)


def _with_identity(draws: np.ndarray) -> np.ndarray:
    return np.vstack([np.arange(draws.shape[1]), draws])


def normalized(scores: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean over tasks of score / reference in every replicate; a task whose reference is 0 in a replicate is left
    out of that replicate's mean (as the point estimate leaves out a task whose reference scores 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.stack([np.where(references[t] > 0, scores[t] / references[t], np.nan) for t in scores])
    return _nanmean(ratios, axis=0)


def mean_of(values: Iterable[np.ndarray]) -> np.ndarray:
    return _nanmean(np.stack(list(values)), axis=0)


def slope(xs: Sequence[float], values: Sequence[np.ndarray]) -> np.ndarray:
    """The least-squares slope of `values` against `xs` in every replicate: does a quantity grow with N, using
    every N rather than the two ends."""
    x = np.asarray(xs, dtype=float) - np.mean(xs)
    y = np.stack(list(values))  # x x replicate
    return (x @ (y - y.mean(axis=0))) / (x @ x)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean of the defined values; NaN (quietly) where none is."""
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
        return np.nanmean(values, axis=axis)


def interval(values: np.ndarray) -> dict[str, float | None]:
    """The point estimate and its percentile 95% interval (None where the point is undefined)."""
    point = float(values[0])
    replicates = values[1:][np.isfinite(values[1:])]
    if not np.isfinite(point) or len(replicates) == 0:
        return {"value": None, "low": None, "high": None}
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return {"value": round(point, 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def verdict(estimate: Mapping[str, float | None]) -> str:
    """What an interval of a difference that the paper says is positive tells: agrees (all above 0), disagrees
    (all below 0) or undetermined (it holds 0, or the estimate is undefined)."""
    if estimate["low"] is None:
        return "undetermined"
    if estimate["low"] > 0:
        return "agrees"
    if estimate["high"] < 0:
        return "disagrees"
    return "undetermined"


def combined(verdicts: Sequence[str]) -> str:
    """A finding that claims several things: it disagrees when any part does, agrees only when every part does."""
    if "disagrees" in verdicts:
        return "disagrees"
    return "agrees" if verdicts and all(v == "agrees" for v in verdicts) else "undetermined"
