"""Racing (`fitness=racing`): score each candidate on growing slices of the search split, only while more rows can
still change what the optimizer does with it.

Every plain task's search rows are put in one seeded order for the whole run. A generation's new candidates are
scored on the first `first_rows` rows of each task, then on the next ones (the slice grows by `growth` each round,
up to the whole split), each row generated once per candidate. Candidates of a generation are scored on the same
rows, so they are compared **row by row**: two merges of the same models mostly get the same rows right, and the
rows where they differ decide far sooner than two separate accuracies would.

After each round, for a candidate and a rival, per component of the objective (a plain task's metric, or each
(task, metric) of a composite score) the difference of their rates on the rows both were scored on gets Agresti
and Min's (2005) interval for matched proportions (half an observation added to each cell of the 2x2 table) at
`confidence`, narrowed by the finite-population correction sqrt((N - n) / (N - 1)): the split is the population,
so rows scored on all N rows differ exactly. The objective's interval is the weighted sum of the components'
differences +- the weighted sum of their half-widths, a bound that holds whatever their correlation.

A candidate is raced on while either question is open:

- **Is it among the parents?** CMA-ES recombines the mu best of a generation (repeats served from the log
  included). A candidate ranked in the top mu is compared with the (mu+1)-th, one below with the mu-th; it is
  decided once the interval of the difference excludes 0, or is no wider than 2 x `indifference`.
- **Can it be the new best?** It is compared with the incumbent (the run's best, scored on every row; its row
  outcomes are kept in its log line), or before there is one with the generation's leader; it is decided once
  it cannot be better by more than `indifference` (the interval's upper end). The leader of the first generation,
  and any candidate that may beat the incumbent by more, is thus raced to the end: only a candidate scored on
  every row (`confirmed`) can become the best.

**Informative rows** (`rows: informative`; MERGE^3 and tinyBenchmarks pick rows by item response theory instead).
Most rows get the same outcome from every merge of the same models; only rows on which candidates differ move a
paired difference. Before each generation the race reads the previous generation's log lines (every raced
candidate keeps its row outcomes there) and splits each task's rows into strata: rows scored on fewer than two of
those candidates (unknown), rows on which some pair of them differed (contested) and rows on which all agreed
(settled). Only the previous generation: CMA-ES samples each generation around the last, so the rows its candidates
split are the ones likely to split the next (on the synthetic search of the tests, learning from the whole run
saved 1% of the rows against random order, from the last two generations 10%, from the last one 12%). The generation reads the
rows stratum by stratum in the order that narrows the expected interval fastest (`informative_layout`), so the
first rounds are mostly contested rows, with enough settled and unknown rows to bound those strata. Estimates and
intervals are then stratified: a stratum's rate or paired difference is weighted by its share of the split (the
estimate stays unbiased for the whole split's rate), the strata's variances add, and each stratum is
finite-population corrected on its own. With one stratum (`rows: random`, or a first generation) every formula is
the plain one above. The strata depend only on earlier log lines, so a resumed run reads the same rows.

`indifference` is an indifference zone, as in Bechhofer's ranking and selection: the smallest fitness difference
worth rows. CMA-ES gives its last parents the least weight, and a gain smaller than that on the search split is
mostly its noise; `fitness.indifference=0` races every open question to the end.
A decided candidate stays out for the rest of the generation, as in any race. The optimizer is told each
candidate's estimate on its rows (a confirmed candidate: its exact fitness). The rule
repeats its interval at every round (no correction for the repeated looks) and settles membership of the parents,
not the ranks inside them, which CMA-ES also weighs: what racing costs in reliability is measured by
`scripts/bench_fitness.py`, not assumed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import stats

from evomerge.eval.task import SAMPLE_METRICS, AnyTask, CompositeTask, SampleScore, Task, plain_tasks
from evomerge.errors import SearchError, settings_problem
from evomerge.search.run import FAILED_FITNESS, Executor, Outcome, Recipe, objective_values


class FullSchedule(BaseModel):
    """`fitness=full`: every candidate on every row of the search split."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    schedule: Literal["full"]


class RacingSchedule(BaseModel):
    """`fitness=racing`: the race's settings (evomerge/conf/fitness/racing.yaml)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    schedule: Literal["racing"]
    first_rows: int = Field(16, ge=1)  # rows per task in the first round
    growth: float = Field(2.0, gt=1)  # each round's rows per task, over the previous round's
    confidence: float = Field(0.95, gt=0, lt=1)  # of each candidate's interval
    indifference: float = Field(0.05, ge=0)  # the smallest fitness difference worth more rows
    rows: Literal["random", "informative"] = "random"  # how a generation's rows are drawn (module docstring)


def fitness_schedule(settings: Mapping[str, Any]) -> RacingSchedule | None:
    """The `fitness` config group's schedule: None for `full`; a bad setting is one line naming it."""
    settings = dict(settings)
    kind = settings.get("schedule")
    model = {"full": FullSchedule, "racing": RacingSchedule}.get(kind)
    if model is None:
        raise SearchError(f"fitness.schedule={kind!r}: use fitness=full or fitness=racing")
    try:
        schedule = model(**settings)
    except ValidationError as error:
        raise SearchError(settings_problem(error, "fitness.")) from None
    return schedule if isinstance(schedule, RacingSchedule) else None


@dataclass(frozen=True)
class Component:
    """One rate the fitness is a weighted sum of: `metric` of plain task `task`, with weight `weight`."""

    task: Task
    metric: str
    weight: float


def components(task: AnyTask, objective: str) -> tuple[Component, ...]:
    """The fitness as a weighted sum of per-row 0/1 rates, or a one-line error for an objective that is not one
    (a race needs rates it can bound: `n`, `tokens` and rates pooled over a composite's rows are not)."""
    if not isinstance(task, (Task, CompositeTask)):
        raise SearchError(f"fitness=racing races on evomerge's own tasks; task {task.name!r} is scored by lm-eval, "
                          "whose metrics come per evaluation: use fitness=full")
    sign, name = (-1.0, objective[1:]) if objective.startswith("-") else (1.0, objective)

    def rate(plain: Task, metric: str) -> str:
        metric = plain.primary_metric if metric == "score" else metric
        if metric not in SAMPLE_METRICS:
            raise SearchError(f"fitness=racing cannot race on objective {objective!r}: it races on rates of 0/1 row "
                              f"outcomes ({', '.join(SAMPLE_METRICS)}, score); use fitness=full")
        return metric

    if isinstance(task, CompositeTask):
        if name == "score":
            return tuple(Component(c.task, rate(c.task, c.metric), sign / len(task.components)) for c in task.components)
        plain_name, _, metric = name.partition("/")
        plain = next((c.task for c in task.components if c.task.name == plain_name), None)
        if plain is None or not metric:
            raise SearchError(f"fitness=racing cannot race on objective {objective!r}: a composite task races on "
                              f"'score' or one component's '<task>/<metric>'; use fitness=full")
        return (Component(plain, rate(plain, metric), sign),)
    return (Component(task, rate(task, name), sign),)


def row_order(task_name: str, size: int, seed: int) -> np.ndarray:
    """The order in which a race reads a task's search rows: one seeded permutation for the whole run."""
    stream = int(hashlib.sha256(task_name.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, stream]).permutation(size)


@dataclass(frozen=True)
class Layout:
    """How one generation reads a task's search rows: `order`, read as growing prefixes, and each split row's
    `stratum` (0, 1, ...; one stratum when rows are drawn at random)."""

    order: np.ndarray
    stratum: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.stratum)

    def labels(self, n: int) -> np.ndarray:
        """The stratum of each of the first n rows read."""
        return self.stratum[self.order[:n]]


def informative_layout(order: np.ndarray, seen: np.ndarray, differ: np.ndarray) -> Layout:
    """A task's rows in strata by what the run's earlier candidates did on them -- unknown (scored on fewer than
    two), contested (some pair of them differed), settled (all agreed) -- read in the order that narrows the
    expected interval of a difference fastest.

    `seen`: candidates scored on each row; `differ`: pairs of them with different outcomes there. A stratum's chance
    that two candidates differ on a row is estimated pooled over its rows by Laplace's rule of succession (an
    unknown row: the known rows' chance), and each next row goes, greedily (optimal for a separable convex cost),
    to the stratum where it most shrinks that stratum's share of the Agresti-Min variance, finite-population
    corrected; within a stratum rows keep the run's seeded order."""
    pairs = seen * (seen - 1) / 2
    known = seen >= 2
    kind = np.where(~known, 0, np.where(differ > 0, 1, 2))  # unknown, contested, settled
    present = [k for k in range(3) if np.any(kind == k)]
    stratum = np.searchsorted(present, kind)
    total = len(order)

    def chance(rows: np.ndarray) -> float:
        return (float(differ[rows].sum()) + 1) / (float(pairs[rows].sum()) + 2)

    rates = [chance(known) if k == 0 else chance(kind == k) for k in present]
    queues = [order[stratum[order] == h] for h in range(len(present))]

    def variance(h: int, n: int) -> float:
        size = len(queues[h])
        return (size / total) ** 2 * (rates[h] + 1 / (n + 2)) / (n + 2) * (size - n) / max(size - 1, 1)

    taken, sequence = [0] * len(queues), []
    for _ in range(total):
        gains = [variance(h, n) - variance(h, n + 1) if n < len(queues[h]) else -math.inf for h, n in enumerate(taken)]
        h = int(np.argmax(gains))
        sequence.append(queues[h][taken[h]])
        taken[h] += 1
    return Layout(np.asarray(sequence), stratum)


@dataclass
class Entrant:
    """A candidate in a race: its rows so far per plain task (a prefix of the race's row order), or only a fitness
    value (a repeat served from the log, a failed candidate)."""

    scores: dict[str, list[SampleScore]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    value: float | None = None


class Race:
    """Races one generation's new candidates at a time (see the module docstring)."""

    def __init__(self, schedule: RacingSchedule, task: AnyTask, objectives: Sequence[str], sizes: Mapping[str, int],
                 *, seed: int, parents: int):
        self.schedule, self.task, self.objectives = schedule, task, tuple(objectives)
        self.components = components(task, objectives[0])
        self.sizes = dict(sizes)  # rows of each plain task's search split
        self.parents = parents
        self.seeded = {name: row_order(name, size, seed) for name, size in self.sizes.items()}
        self.layouts = {name: Layout(order, np.zeros(len(order), dtype=int)) for name, order in self.seeded.items()}
        self.z = float(stats.norm.ppf(0.5 + schedule.confidence / 2))

    @property
    def order(self) -> dict[str, np.ndarray]:
        """Per task, the order in which this generation reads its rows."""
        return {name: layout.order for name, layout in self.layouts.items()}

    def rounds(self) -> list[dict[str, tuple[int, int]]]:
        """Per round, per task: the slice of its row order scored in that round (empty once a task is done)."""
        bounds, done, rows = [], dict.fromkeys(self.sizes, 0), float(self.schedule.first_rows)
        while any(done[name] < size for name, size in self.sizes.items()):
            upto = {name: min(size, math.ceil(rows)) for name, size in self.sizes.items()}
            bounds.append({name: (done[name], upto[name]) for name in self.sizes})
            done, rows = upto, rows * self.schedule.growth
        return bounds

    def learn(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Lay out the next generation's rows: in the seeded order, or (`rows: informative`) stratified by what the
        previous generation's raced candidates (their log lines' `row_outcomes`) did on each row."""
        if self.schedule.rows == "random":
            return
        raced = [entry for entry in history if "row_outcomes" in entry]
        previous = [entry for entry in raced if entry["generation"] == raced[-1]["generation"]] if raced else []
        for name, size in self.sizes.items():
            seen, differ = np.zeros(size), np.zeros(size)
            for component in (c for c in self.components if c.task.name == name):
                marks = [np.frombuffer(entry["row_outcomes"][self._key(component)].encode(), dtype=np.uint8)
                         for entry in previous]
                seen = sum((m != ord("-") for m in marks), np.zeros(size))
                right = sum((m == ord("1") for m in marks), np.zeros(size))
                differ += right * (seen - right)
            self.layouts[name] = informative_layout(self.seeded[name], seen, differ)

    def run(self, executor: Executor, recipes: Sequence[Recipe], incumbent: Mapping[str, Any] | None = None,
            others: Sequence[float] = (), history: Sequence[Mapping[str, Any]] = ()) -> list[Outcome]:
        """Each recipe's outcome: metrics on the rows it was scored on, its estimated fitness, whether it was scored
        on every row (`confirmed`), and its row outcomes. `incumbent`: the run's best log entry so far; `others`: the
        fitness of the generation's candidates not raced here (repeats), ranked with them; `history`: the run's
        log entries so far (what informative rows learn from)."""
        self.learn(history)
        entrants = [Entrant() for _ in recipes]
        seconds: list[dict[str, float]] = [{} for _ in recipes]
        errors: list[str | None] = [None] * len(recipes)
        active = list(range(len(recipes)))
        for bounds in self.rounds():
            rows = {name: self.order[name][start:stop].tolist() for name, (start, stop) in bounds.items() if stop > start}
            for i, outcome in zip(active, executor.map([recipes[i] for i in active], rows)):
                if outcome.error is not None:
                    errors[i], entrants[i] = outcome.error, Entrant(value=FAILED_FITNESS)
                    continue
                for name, scored in outcome.rows.items():
                    entrants[i].scores.setdefault(name, []).extend(scored.scores)
                    entrants[i].tokens.setdefault(name, []).extend(scored.tokens)
                for key, value in outcome.seconds.items():
                    seconds[i][key] = round(seconds[i].get(key, 0.0) + value, 4)
            contenders = [*entrants, *(Entrant(value=value) for value in others)]
            estimates = [self.estimate(entrant) for entrant in contenders]
            ranked = sorted(range(len(contenders)), key=lambda j: -estimates[j])
            active = [i for i in active if errors[i] is None and self._open(i, contenders, ranked, incumbent)]
            if not active:
                break
        return [Outcome({}, seconds[i], errors[i], confirmed=False) if errors[i] is not None
                else self._outcome(entrants[i], seconds[i]) for i in range(len(recipes))]

    def estimate(self, entrant: Entrant) -> float:
        """The fitness on the rows scored so far, each stratum weighted by its share of the split (the plain rate
        when rows are drawn at random; exact once every row is scored)."""
        if entrant.value is not None:
            return entrant.value
        return sum(c.weight * self._rate(c, self._outcomes(entrant, c)) for c in self.components)

    def difference(self, entrant: Entrant, rival: Entrant | Mapping[str, str]) -> tuple[float, float, float]:
        """(estimate, low, high) of the entrant's fitness minus the rival's, row by row on the rows both were
        scored on; the rival is another entrant or the incumbent's row outcomes (split order, every row)."""
        if isinstance(rival, Entrant) and rival.value is not None:  # a value alone: the entrant's own interval
            return self._minus_value(entrant, rival.value)
        estimate = centre = half = 0.0
        for component in self.components:
            layout = self.layouts[component.task.name]
            mine = self._outcomes(entrant, component)
            if isinstance(rival, Entrant):
                theirs = self._outcomes(rival, component)
            else:
                theirs = np.array([c == "1" for c in rival[self._key(component)]])[layout.order]
            estimate += component.weight * (self._rate(component, mine) - self._rate(component, theirs))
            n = min(len(mine), len(theirs))
            labels, variance = layout.labels(n), 0.0
            for h, size in enumerate(layout.sizes):  # per stratum, weighted by its share of the split
                share, mine_h, theirs_h = size / len(layout.stratum), mine[:n][labels == h], theirs[:n][labels == h]
                n_h = len(mine_h)
                better, worse = int(np.sum(mine_h & ~theirs_h)), int(np.sum(~mine_h & theirs_h))
                if n_h >= size:  # every row: the difference is the stratum's own
                    centre += component.weight * share * (better - worse) / n_h
                    continue
                cells = n_h + 2  # Agresti & Min (2005): half an observation added to each of the four cells
                better_, worse_ = (better + 0.5) / cells, (worse + 0.5) / cells
                spread = math.sqrt(max(better_ + worse_ - (better_ - worse_) ** 2, 0.0) / cells)
                centre += component.weight * share * (better_ - worse_)
                variance += (share * spread) ** 2 * (size - n_h) / max(size - 1, 1)
            half += abs(component.weight) * self.z * math.sqrt(variance)
        return estimate, centre - half, centre + half

    def _minus_value(self, entrant: Entrant, value: float) -> tuple[float, float, float]:
        """The entrant's fitness minus a fixed value: Wilson score intervals per stratum (scipy), narrowed by the
        finite-population correction and combined in quadrature."""
        centre = half = 0.0
        for component in self.components:
            layout, mine = self.layouts[component.task.name], self._outcomes(entrant, component)
            labels, variance = layout.labels(len(mine)), 0.0
            for h, size in enumerate(layout.sizes):
                share, mine_h = size / len(layout.stratum), mine[labels == h]
                n_h, right = len(mine_h), int(np.sum(mine_h))
                if n_h >= size:
                    centre += component.weight * share * right / n_h
                    continue
                low, high = (0.0, 1.0) if n_h == 0 else stats.binomtest(right, n_h).proportion_ci(
                    self.schedule.confidence, method="wilson")
                centre += component.weight * share * (low + high) / 2
                variance += (share * (high - low) / 2) ** 2 * (size - n_h) / max(size - 1, 1)
            half += abs(component.weight) * math.sqrt(variance)
        return self.estimate(entrant) - value, centre - half - value, centre + half - value

    def _open(self, i: int, entrants: Sequence[Entrant], ranked: Sequence[int],
              incumbent: Mapping[str, Any] | None) -> bool:
        """Whether candidate i has rows left and a question open: parents or not, new best or not."""
        me = entrants[i]
        if all(len(me.scores[name]) >= size for name, size in self.sizes.items()):
            return False
        rank = ranked.index(i)
        if len(ranked) > self.parents:
            rival = ranked[self.parents] if rank < self.parents else ranked[self.parents - 1]
            _, low, high = self.difference(me, entrants[rival])
            if low <= 0 <= high and high - low > 2 * self.schedule.indifference:
                return True
        if incumbent is not None:
            best = incumbent.get("row_outcomes") or Entrant(value=incumbent["fitness"][0])
        elif rank == 0:
            return True  # the generation's leader, with no incumbent: confirm it
        else:
            best = entrants[ranked[0]]
        return self.difference(me, best)[2] > self.schedule.indifference

    def _outcomes(self, entrant: Entrant, component: Component) -> np.ndarray:
        return np.array([score.outcome(component.metric) for score in entrant.scores[component.task.name]], dtype=bool)

    def _rate(self, component: Component, outcomes: np.ndarray) -> float:
        """A component's rate from its outcomes on the first rows read: per stratum, weighted by the strata's
        shares of the split (over the strata read so far)."""
        layout = self.layouts[component.task.name]
        labels = layout.labels(len(outcomes))
        read = [(size, outcomes[labels == h]) for h, size in enumerate(layout.sizes) if np.any(labels == h)]
        return sum(size * float(np.mean(rows)) for size, rows in read) / sum(size for size, _ in read)

    @staticmethod
    def _key(component: Component) -> str:
        return f"{component.task.name}/{component.metric}"

    def _outcome(self, entrant: Entrant, seconds: dict[str, float]) -> Outcome:
        per_task = {plain.name: plain.metrics(entrant.scores[plain.name], "search", sum(entrant.tokens[plain.name]))
                    for plain in plain_tasks(self.task)}
        metrics = self.task.combine(per_task, "search") if isinstance(self.task, CompositeTask) else per_task[self.task.name]
        confirmed = all(len(entrant.scores[name]) >= size for name, size in self.sizes.items())
        row_outcomes = {}  # in the log line: later generations compare with it row by row, and learn from it
        for component in self.components:
            mine, marks = self._outcomes(entrant, component), np.full(self.sizes[component.task.name], "-")
            marks[self.order[component.task.name][:len(mine)]] = np.where(mine, "1", "0")
            row_outcomes[self._key(component)] = "".join(marks)
        fitness = tuple(objective_values(metrics, self.objectives))  # exact once confirmed; else the estimate
        fitness = fitness if confirmed else (self.estimate(entrant), *fitness[1:])
        return Outcome(metrics, seconds, fitness=fitness, confirmed=confirmed, row_outcomes=row_outcomes)
