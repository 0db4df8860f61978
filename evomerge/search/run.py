"""The generation loop every search shares: ask, evaluate, log, tell, checkpoint -- and resume exactly.

A run directory holds:
- `log.jsonl`: one line per candidate (generation, genome, recipe hash, metrics, fitness, seconds, error);
- `checkpoint.json`: written atomically after every generation (temp file, fsync, rename; the previous one kept as
  `checkpoint.prev.json`), with a checksum. It holds the settings, counters, elapsed time, the best candidate and
  the told history -- every generation's genomes and fitness -- from which the optimizer is rebuilt by replay;
- `best_recipe.yaml`, kept current;
- `tracker.json` with `tracker=wandb` or `tracker=tensorboard`: the tracker run that shows the search's progress
  (`evomerge.search.tracker`), continued on resume.
Each generation's new recipes go to an executor (serial here, or Ray workers) that yields outcomes in order, so
the log does not depend on where candidates ran. Resuming after a kill at any moment: the optimizer is replayed from the checkpoint, log lines written after it
(a generation cut short) are taken back and reused verbatim when the replayed generation asks for the same
candidates, so the log and the best recipe come out as in an uninterrupted run.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from evomerge.errors import SearchError
from evomerge.search.optimizer import Optimizer

CHECKPOINT_FORMAT = "evomerge-checkpoint"
CHECKPOINT_VERSION = 1
FAILED_FITNESS = -1.0  # below any metric in [0, 1]: a candidate that crashed is the worst candidate


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # what SLURM sends before a timeout or a preemption


class Interrupted(BaseException):
    """A scheduler's stop signal arrived: not an `Exception`, so no `except Exception` (evaluate_safely's) takes it
    for a failed candidate; the run resumes from its last checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_signals() -> Iterator[None]:
    """While a search runs, SIGTERM and SIGUSR2 raise Interrupted -- where nothing else handles them: submitit's own
    handlers (checkpoint and requeue on SIGUSR2, ignore SIGTERM) are left in place."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    for signum, handler in previous.items():
        if handler is signal.SIG_DFL:
            signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Recipe(Protocol):
    @property
    def hash(self) -> str: ...

    def save(self, path: str | Path) -> Path: ...


class Problem(Protocol):
    """What a search optimises: genomes decode to recipes, recipes are evaluated into metrics."""

    objectives: tuple[str, ...]  # metric names, maximised; a leading "-" minimises; the first is the primary fitness

    def decode(self, genome: np.ndarray) -> Recipe: ...

    def evaluate(self, recipe: Recipe) -> tuple[dict[str, Any], dict[str, float]]: ...  # metrics, seconds

    # A problem that can be raced (fitness=racing) also has
    #   evaluate_rows(recipe, rows) -> ({plain task: its scored rows}, seconds)
    # where rows maps each plain task to indices of its search split (evomerge.search.racing).

    def load(self) -> None: ...  # what evaluating needs (the pool) into memory now, not on first use

    def report_row(self, item: Any) -> dict[str, Any]: ...  # one row of the held-out report


def objective_values(metrics: Mapping[str, Any], objectives: Sequence[str]) -> list[float]:
    """Fitness, higher is better: the named metrics, negated where the name starts with "-"."""
    values = [-float(metrics[name[1:]]) if name.startswith("-") else float(metrics[name]) for name in objectives]
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite fitness {values}")
    return values


@dataclass(frozen=True)
class Outcome:
    """One evaluated recipe: its metrics, timings and fitness (the problem's objectives), or the error that ended it.
    `confirmed`: scored on every row of the search split (a race stops most candidates short of that). A race's
    round yields `rows` instead of metrics (each plain task's scored rows), and a raced candidate keeps its
    `row_outcomes` (for row-by-row comparisons with it, and for learning which rows separate candidates)."""

    metrics: dict[str, Any]
    seconds: dict[str, float]
    error: str | None = None
    fitness: tuple[float, ...] = ()
    confirmed: bool = True
    rows: Mapping[str, Any] | None = None
    row_outcomes: dict[str, str] | None = None


Rows = Mapping[str, Sequence[int]]  # per plain task: indices of rows of its search split


def evaluate_safely(problem: Problem, recipe: Recipe, rows: Rows | None = None) -> Outcome:
    """A bad candidate must not end a long search: its exception (a merge or evaluation error, NaN/inf weights,
    logits or metrics, running out of memory) becomes a logged error and the candidate scores as failed. A scheduler
    stopping the job is no candidate's error: it goes up (Interrupted, SystemExit and KeyboardInterrupt are not
    Exceptions; submitit's UncompletedJobError is, see _stops_the_job). With `rows`, only those rows are scored
    (`Problem.evaluate_rows`): the outcome holds each plain task's metrics on them, and a race pools them."""
    try:
        if rows is not None:
            scored, seconds = problem.evaluate_rows(recipe, rows)
            return Outcome({}, seconds, rows=scored, confirmed=False)
        metrics, seconds = problem.evaluate(recipe)
        return Outcome(metrics, seconds, fitness=tuple(objective_values(metrics, problem.objectives)))
    except Exception as exc:
        if _stops_the_job(exc):
            raise
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        out_of_memory = _is_out_of_memory(exc)
    if out_of_memory:  # outside the handler, so the traceback's frames (and their tensors) are gone
        _free_memory()
        error = f"out of memory: {error}"
    return Outcome({}, {}, error)


def _stops_the_job(exc: Exception) -> bool:
    """submitit's SIGUSR2 handler raises UncompletedJobError (a RuntimeError) where the candidate happens to be
    when a job timed out once too often: the job ends, the candidate did not fail."""
    submitit_utils = sys.modules.get("submitit.core.utils")  # not imported here: loaded only inside a submitit job
    return submitit_utils is not None and isinstance(exc, submitit_utils.UncompletedJobError)


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported here: a search over a non-torch problem stays light
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch's CPU allocator


def _free_memory() -> None:
    """Drop what the failed candidate held, and hand the CUDA cache back so the next candidate can use it."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Executor(Protocol):
    """Evaluates a generation's recipes, yielding outcomes in the order given (serially or on workers); with
    `rows`, each on those rows of the search split only (a race's round)."""

    def map(self, recipes: Sequence[Recipe], rows: Rows | None = None) -> Iterator[Outcome]: ...

    def report(self, items: Sequence[Any]) -> list[dict[str, Any]]: ...  # held-out report rows, in order

    @property
    def idle_share(self) -> float | None: ...  # of the last map: worker time idle at the barrier (None: no workers)

    def close(self) -> None: ...


class SerialExecutor:
    """Every candidate in this process, one after the other, on the problem's resident pool."""

    idle_share = None  # one process, no workers to leave idle

    def __init__(self, problem: Problem):
        self.problem = problem

    def map(self, recipes: Sequence[Recipe], rows: Rows | None = None) -> Iterator[Outcome]:
        for recipe in recipes:
            yield evaluate_safely(self.problem, recipe, rows)

    def report(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        return [self.problem.report_row(item) for item in items]

    def close(self) -> None:
        pass


class Tracker(Protocol):
    """Shows a search's progress as it runs (`evomerge.search.tracker`: Weights & Biases or TensorBoard)."""

    @property
    def logged(self) -> int: ...  # generations logged so far: a resumed run logs those after them, each once

    def generation(self, step: int, metrics: Mapping[str, float]) -> None: ...  # `generation_metrics` of one

    def artifact(self, path: Path) -> None: ...  # the recipe a stage reports (best_recipe.yaml, chosen_recipe.yaml)

    def table(self, rows: Sequence[Mapping[str, Any]]) -> None: ...  # the held-out report's rows

    def close(self) -> None: ...


class NoTracker:
    """tracker=none: progress goes to log.jsonl and the terminal only."""

    logged = 0

    def generation(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def table(self, rows: Sequence[Mapping[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def rows_scored(entries: Sequence[Mapping[str, Any]]) -> int:
    """Answers generated for these log entries (a cached repeat generates none)."""
    return sum(entry["metrics"].get("n", 0) for entry in entries if not entry["cached"])


def generation_metrics(entries: Sequence[Mapping[str, Any]], generation: int) -> dict[str, float]:
    """What a tracker shows of one generation, read from the log alone (so a resumed run can log the generations
    a kill left unlogged): the best fitness so far (of candidates scored on every row, as the run's best is); the
    generation's best, mean and standard deviation of the fitness told to the optimizer (failed candidates left
    out, and counted); candidates evaluated so far; rows scored; and the seconds of each part of evaluating its
    candidates, summed (`merge`, and `eval`: generating and scoring answers)."""
    done = [entry for entry in entries if entry["generation"] <= generation]
    this = [entry for entry in done if entry["generation"] == generation]
    confirmed = [entry["fitness"][0] for entry in done if entry["error"] is None and entry.get("confirmed", True)]
    scored = [entry["fitness"][0] for entry in this if entry["error"] is None]
    metrics = {"evaluations": len(done), "failed": len(this) - len(scored), "rows_scored": rows_scored(this)}
    if confirmed:
        metrics["fitness/best_so_far"] = max(confirmed)
    if scored:
        metrics.update({"fitness/generation_best": max(scored), "fitness/generation_mean": float(np.mean(scored)),
                        "fitness/generation_std": float(np.std(scored))})
    for entry in this:
        for part, seconds in entry["seconds"].items():
            metrics[f"seconds/{part}"] = metrics.get(f"seconds/{part}", 0.0) + seconds
    return metrics


class Race(Protocol):
    """Scores a generation's new recipes on as many rows as decide something (`evomerge.search.racing`)."""

    def run(self, executor: Executor, recipes: Sequence[Recipe], incumbent: Mapping[str, Any] | None = None,
            others: Sequence[float] = (), history: Sequence[Mapping[str, Any]] = ()) -> list[Outcome]: ...


@dataclass(frozen=True)
class Budget:
    """Stop at whichever comes first; a generation is never cut short by the budget."""

    generations: int
    max_seconds: float | None = None
    max_evaluations: int | None = None

    def spent(self, state: Mapping[str, Any], elapsed: float) -> bool:
        return (
            state["generation"] >= self.generations
            or (self.max_seconds is not None and elapsed >= self.max_seconds)
            or (self.max_evaluations is not None and state["evaluations"] >= self.max_evaluations)
        )


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    current, previous = run_dir / "checkpoint.json", run_dir / "checkpoint.prev.json"
    document = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "checksum": _digest(payload), **payload}
    if current.exists():
        os.replace(current, previous)
    write_json_atomic(current, document)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that parses and matches its checksum; None for a fresh run directory."""
    problems = []
    for path in (run_dir / "checkpoint.json", run_dir / "checkpoint.prev.json"):
        if not path.exists():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{path.name} is unreadable ({error})")
            continue
        if not isinstance(document, dict):
            problems.append(f"{path.name} is not a JSON object")
            continue
        if document.get("format") != CHECKPOINT_FORMAT or document.get("version") != CHECKPOINT_VERSION:
            raise SearchError(
                f"{path} is not an evomerge checkpoint of version {CHECKPOINT_VERSION} "
                f"(format {document.get('format')!r}, version {document.get('version')!r})"
            )
        payload = {k: v for k, v in document.items() if k not in ("format", "version", "checksum")}
        if document.get("checksum") != _digest(payload):
            problems.append(f"{path.name} fails its checksum")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; resuming from {path.name}")
        return payload
    if problems:
        raise SearchError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}")
    return None


def _revision_change(a: Any, b: Any) -> tuple[str, str, str] | None:
    """(hub id, its revision now, the run's) when the first difference of a and b is a hub model's revision alone
    (a pool identity, `evomerge.pool.member_identity`), else None."""
    pairs = zip(a, b) if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) else [(a, b)]
    then, now = next(((x, y) for x, y in pairs if x != y), (None, None))
    if (isinstance(then, Mapping) and isinstance(now, Mapping) and then.keys() == now.keys() == {"hub", "revision"}
            and then["hub"] == now["hub"]):
        return then["hub"], now["revision"], then["revision"]
    return None


def check_settings(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse to resume under different settings, naming the first one that differs (a pool model at another hub
    revision: by its id and both revisions)."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        change = _revision_change(a, b)
        if change is not None:
            raise SearchError(f"cannot resume: {prefix}{key} {change[0]} is at revision {change[1]} now, "
                              f"the run used {change[2]}")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            check_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            raise SearchError(
                f"cannot resume: setting {prefix}{key} was {json.dumps(a)} in the checkpoint, is {json.dumps(b)} now"
            )


class CandidateLog:
    """`log.jsonl`, appended line by line; lines past the checkpoint are kept aside for replay."""

    def __init__(self, path: Path, keep_lines: int):
        self.path = path
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) < keep_lines:
            raise SearchError(f"{path} has {len(lines)} lines but the checkpoint counts {keep_lines}: the log was cut")
        self.entries = [json.loads(line) for line in lines[:keep_lines]]
        self.pending = {}
        for line in lines[keep_lines:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the half-written last line of a killed process
                continue
            self.pending[entry["index"]] = entry
        write_text_atomic(path, "".join(line + "\n" for line in lines[:keep_lines]))

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.append(entry)


@dataclass
class SearchResult:
    best: dict[str, Any]
    history: list[dict[str, Any]]
    evaluations: int
    entries: list[dict[str, Any]]


def run_search(
    run_dir: str | Path,
    problem: Problem,
    make_optimizer: Callable[[], Optimizer],
    settings: Mapping[str, Any],
    budget: Budget,
    *,
    executor: Executor | None = None,
    race: Race | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) a search in `run_dir` until the budget is spent or the optimizer stops.

    `executor` evaluates each generation (default: serially in this process); the log is the same either way.
    `race` (fitness=racing) scores each generation's new candidates on as many rows as decide something; without
    it every candidate is scored on the whole search split. `tracker` shows each generation as it ends (default:
    nowhere); on resume it first logs any generation the checkpoint holds that it has not logged yet."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings))  # plain JSON types, as a checkpoint stores them
    state = load_checkpoint(run_dir)
    if state is None:
        if (run_dir / "log.jsonl").exists():
            raise SearchError(f"{run_dir} has a log but no checkpoint: not a run this version can resume")
        state = {"settings": settings, "generation": 0, "evaluations": 0, "log_lines": 0,
                 "elapsed_seconds": 0.0, "history": [], "best": None}
        save_checkpoint(run_dir, state)  # a run killed in its first generation is still a run that resumes
    else:
        check_settings(state["settings"], settings)
    optimizer = make_optimizer()
    _replay(optimizer, state["history"])
    log = CandidateLog(run_dir / "log.jsonl", state["log_lines"])
    cache = {e["recipe_hash"]: e for e in log.entries if e["error"] is None and not e["cached"]}
    if race is None:  # a race reuses a killed run's lines only as a whole generation (see _generation)
        cache.update({e["recipe_hash"]: e for e in log.pending.values() if e["error"] is None and not e["cached"]})

    executor = executor if executor is not None else SerialExecutor(problem)
    tracker = tracker if tracker is not None else NoTracker()
    for generation in range(tracker.logged, state["generation"]):
        tracker.generation(generation, generation_metrics(log.entries, generation))
    started = time.perf_counter() - state["elapsed_seconds"]
    with _stop_signals(), Progress(budget.generations, state["generation"], progress) as shown:
        _loop(run_dir, problem, optimizer, budget, executor, race, state, log, cache, started, shown, tracker)
    if state["best"] is None:
        raise SearchError(f"no candidate of {run_dir} was evaluated successfully; see the errors in log.jsonl")
    return SearchResult(state["best"], state["history"], state["evaluations"], log.entries)


class Progress:
    """A progress bar on a terminal; elsewhere (a scheduler's log file) one plain line per generation, so a job's
    log is not flooded with bar redraws."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = tqdm(total=total, initial=done, desc="search", unit="gen",
                        disable=not (enabled and sys.stderr.isatty()))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.close()

    def update(self, state: Mapping[str, Any]) -> None:
        best = f"{state['best']['fitness'][0]:.3f}" if state["best"] is not None else "none yet"
        told = state["history"][-1] if state["history"] else {}
        idle, answers = told.get("idle_share"), told.get("answers", 0)
        rows = f"{answers / len(told['genomes']):.0f}" if told else "0"  # answers generated per candidate
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix(best=best, rows=rows, **({"idle": f"{idle:.0%}"} if idle is not None else {}))
        elif self.enabled:
            print(f"search: generation {state['generation']}/{self.total}, {state['evaluations']} evaluations, "
                  f"best {best}, {rows} rows scored per candidate, {state['elapsed_seconds']:.0f}s"
                  + (f", workers idle {idle:.0%} at the barrier" if idle is not None else ""), file=sys.stderr, flush=True)


def _loop(run_dir: Path, problem: Problem, optimizer: Optimizer, budget: Budget, executor: Executor,
          race: Race | None, state: dict[str, Any], log: CandidateLog, cache: dict, started: float,
          shown: Progress, tracker: Tracker) -> None:
    """Generations until the budget is spent or the optimizer stops, each checkpointed as it ends, then tracked.
    Only a candidate scored on every row (`confirmed`) can become the best."""
    while not budget.spent(state, time.perf_counter() - started) and not optimizer.done():
        genomes = optimizer.ask()
        fitness, confirmed = [], []
        for entry in _generation(problem, executor, race, genomes, state, log, cache):
            log.append(entry)
            state["evaluations"] += 1
            fitness.append(entry["fitness"])
            confirmed.append(entry.get("confirmed", True))  # lines from before racing existed: all confirmed
            if (entry["error"] is None and confirmed[-1]
                    and (state["best"] is None or entry["fitness"][0] > state["best"]["fitness"][0])):
                state["best"] = entry
                problem.decode(np.asarray(entry["genome"])).save(run_dir / "best_recipe.yaml.tmp")
                os.replace(run_dir / "best_recipe.yaml.tmp", run_dir / "best_recipe.yaml")
        optimizer.tell(genomes, fitness)
        told = {"genomes": [g.tolist() for g in genomes], "fitness": fitness,
                "answers": rows_scored(log.entries[-len(genomes):])}
        if race is not None:  # which told fitness values are estimates on part of the split
            told["confirmed"] = confirmed
        if executor.idle_share is not None:  # parallel workers: their time idle at this generation's barrier
            told["idle_share"] = round(executor.idle_share, 4)
        state["history"].append(told)
        state["generation"] += 1
        state["log_lines"] = len(log.entries)
        state["elapsed_seconds"] = time.perf_counter() - started
        _check_failures(log.entries)
        save_checkpoint(run_dir, state)
        tracker.generation(state["generation"] - 1, generation_metrics(log.entries, state["generation"] - 1))
        shown.update(state)


def _replay(optimizer: Optimizer, history: Sequence[Mapping[str, Any]]) -> None:
    for generation, told in enumerate(history):
        asked = optimizer.ask()
        stored = [np.asarray(g) for g in told["genomes"]]
        if len(asked) != len(stored) or not all(np.array_equal(a, b) for a, b in zip(asked, stored)):
            raise SearchError(
                f"replaying the checkpoint diverged at generation {generation}: the optimizer (or its library "
                "version) differs from the one that wrote it"
            )
        optimizer.tell(asked, told["fitness"])


def _generation(problem: Problem, executor: Executor, race: Race | None, genomes: Sequence[np.ndarray], state: dict,
                log: CandidateLog, cache: dict) -> Iterator[dict[str, Any]]:
    """Log entries for one generation, in genome order. Only recipes that are new -- not in a log line a killed
    run left behind, not cached, not repeated earlier in this generation -- go to the executor (or the race).

    A race's outcomes depend on every candidate raced with them, so under racing a killed run's lines are reused
    only when the whole generation was logged; otherwise the generation is raced again, deterministically, into
    the same lines."""
    entries, jobs = [], []
    first_seen: dict[str, dict[str, Any]] = {}
    recipes = [problem.decode(genome) for genome in genomes]
    keys = [recipe.hash for recipe in recipes]  # a DFS recipe's hash serializes its whole path: read it once
    indices = [state["evaluations"] + offset for offset in range(len(genomes))]
    logged = [log.pending.get(index) is not None and log.pending[index]["recipe_hash"] == key
              for index, key in zip(indices, keys)]
    if race is not None and not all(logged):
        logged = [False] * len(genomes)
    for genome, recipe, key, index, was_logged in zip(genomes, recipes, keys, indices, logged):
        if was_logged:
            entries.append(("pending", log.pending[index]))
            continue
        entry = {"index": index, "generation": state["generation"], "genome": genome.tolist(), "recipe_hash": key}
        if key in cache or key in first_seen:
            entries.append(("repeat", entry))
        else:
            first_seen[key] = entry
            entries.append(("new", entry))
            jobs.append(recipe)
    if race is None:
        outcomes = executor.map(jobs)
    else:
        others = [cache[entry["recipe_hash"]]["fitness"][0] for kind, entry in entries
                  if kind == "repeat" and entry["recipe_hash"] in cache]
        outcomes = iter(race.run(executor, jobs, state["best"], others, log.entries))
    for kind, entry in entries:
        if kind == "pending":
            yield entry
        elif kind == "new":
            outcome = next(outcomes)
            fitness = ([FAILED_FITNESS] * len(problem.objectives) if outcome.error
                       else list(outcome.fitness))
            entry.update(metrics=outcome.metrics, fitness=fitness, seconds=outcome.seconds, cached=False,
                         error=outcome.error, confirmed=outcome.confirmed and outcome.error is None)
            if outcome.row_outcomes is not None:
                entry["row_outcomes"] = outcome.row_outcomes
            if outcome.error is None:
                cache[entry["recipe_hash"]] = entry
            yield entry
        else:
            hit = cache.get(entry["recipe_hash"]) or first_seen[entry["recipe_hash"]]
            yield {**entry, "metrics": hit["metrics"], "fitness": hit["fitness"], "seconds": {}, "cached": True,
                   "error": hit["error"], "confirmed": hit.get("confirmed", True)}


def _check_failures(entries: Sequence[Mapping[str, Any]], minimum: int = 8) -> None:
    failed = [e for e in entries if e["error"] is not None]
    if len(entries) >= minimum and len(failed) > len(entries) / 2:
        raise SearchError(
            f"{len(failed)} of {len(entries)} candidates failed; the last error was: {failed[-1]['error']}"
        )
