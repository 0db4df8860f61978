"""Where a generation's candidates are evaluated: in the search process (`executor=serial`, the default) or on Ray
actors (`executor=ray`), each of which builds the problem once -- the pool resident in its memory or on its GPU --
and evaluates recipes with `evaluate_safely`, exactly as the serial executor does.

`RayExecutor.map` keeps every actor busy (a candidate goes to whichever actor is free) and yields outcomes in the
order of the recipes it was given, so `run_search` writes the same log whichever executor ran it. A worker that dies
(killed, out of memory, its node lost) is replaced by a new actor and its candidate evaluated again, up to
`max_retries` times; after that the candidate is logged as failed with an error saying its worker died -- never
dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.modelio import POLICY, LoadPolicy, error_line, set_load_policy
from evomerge.search.run import (
    Executor,
    Outcome,
    Problem,
    Recipe,
    SearchError,
    SerialExecutor,
    evaluate_safely,
)

ProblemFactory = Callable[[], Any]  # returns a Problem, or a (problem, make_optimizer) pair as ps.make_problem does


class _Worker:
    """One Ray actor: the problem built once (under the driver's model-loading policy: an actor is a fresh
    process), then one recipe at a time."""

    def __init__(self, problem_factory: ProblemFactory, load_policy: LoadPolicy):
        set_load_policy(**dataclasses.asdict(load_policy))
        built = problem_factory()
        self.problem = built[0] if isinstance(built, tuple) else built

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, recipe: Recipe) -> Outcome:
        return evaluate_safely(self.problem, recipe)


class RayExecutor:
    """Candidates evaluated in parallel on `workers` Ray actors (`num_gpus` GPUs and `num_cpus` CPUs each).

    `address`: None starts a local Ray instance (stopped again by `close`), "auto" joins the cluster this machine is
    part of (`ray start --head` / `ray start --address=...`), or any address `ray.init` accepts. When Ray is already
    initialised in this process, that instance is used as it is."""

    def __init__(
        self,
        problem_factory: ProblemFactory,
        *,
        workers: int = 2,
        address: str | None = None,
        num_gpus: float = 0,
        num_cpus: float = 1,
        max_retries: int = 2,
        startup_timeout_s: float | None = 1800,
    ):
        try:
            import ray
        except ImportError:
            raise SearchError("executor=ray needs Ray: pip install 'evomerge[ray]'") from None
        if workers < 1:
            raise SearchError(f"executor.workers={workers}: need at least one worker")
        if max_retries < 0:
            raise SearchError(f"executor.max_retries={max_retries}: must be 0 or more")
        self._ray = ray
        self.problem_factory = problem_factory
        self.max_retries = int(max_retries)
        self.workers = int(workers)
        self._started_ray = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
            if address is None:  # a local instance: room for every actor even where cores are fewer
                options["num_cpus"] = max(os.cpu_count() or 1, int(workers * num_cpus + 0.999))
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise SearchError(f"executor.address={address}: cannot start or join Ray: {error_line(error)}") from None
            self._started_ray = True
        self._actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Worker)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self.replaced = 0  # actors that died and were replaced
        try:
            self.pids = ray.get([actor.ready.remote() for actor in self.actors], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise SearchError(
                f"the {workers} Ray workers did not start within {startup_timeout_s} s: the cluster may lack the "
                f"resources asked for ({num_cpus} CPU and {num_gpus} GPU per worker; `ray status` shows what it has)"
            ) from None
        except ray.exceptions.RayError as error:
            self.close()
            raise SearchError(f"a Ray worker could not build the search problem: {_last_line(error)}") from None

    def _new_actor(self):
        return self._actor_class.remote(self.problem_factory, copy.copy(POLICY))

    def _replace(self, slot: int) -> None:
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.replaced += 1

    def map(self, recipes: Sequence[Recipe]) -> Iterator[Outcome]:
        ray = self._ray
        recipes = list(recipes)
        queue = deque(range(len(recipes)))
        attempts = [0] * len(recipes)
        done: dict[int, Outcome] = {}
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (recipe index, actor slot)
        idle = deque(range(len(self.actors)))
        following = 0
        while following < len(recipes):
            while queue and idle:
                index, slot = queue.popleft(), idle.popleft()
                attempts[index] += 1
                running[self.actors[slot].evaluate.remote(recipes[index])] = (index, slot)
            if following in done:
                yield done.pop(following)
                following += 1
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index, slot = running.pop(ref)
                try:
                    done[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # raised past evaluate_safely (not an Exception)
                    done[index] = Outcome({}, {}, _last_line(error))
                except ray.exceptions.RayError as error:  # the actor's process is gone
                    self._replace(slot)
                    if attempts[index] <= self.max_retries:
                        queue.appendleft(index)  # again, first, on a free (or the new) actor
                    else:
                        done[index] = Outcome({}, {}, (
                            f"WorkerDied: the Ray worker evaluating this candidate died {attempts[index]} times "
                            f"({type(error).__name__}: {error_line(error)})"))
                idle.append(slot)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_ray = False


def _last_line(error: BaseException) -> str:
    """Ray's error text ends with the worker's own exception ("RuntimeError: ..."): the line that says why."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


EXECUTOR_KEYS = {"workers", "address", "num_gpus", "num_cpus", "max_retries", "startup_timeout_s"}


def make_executor(cfg: DictConfig | Mapping[str, Any], problem: Problem, problem_factory: ProblemFactory) -> Executor:
    """The executor `cfg.executor` names: `serial` evaluates on `problem` in this process, `ray` on actors that
    each build their own problem with `problem_factory` (picklable: e.g. functools.partial(ps.make_problem, cfg,
    pool)). A config without an `executor` group is serial."""
    settings = OmegaConf.select(cfg, "executor") if isinstance(cfg, DictConfig) else cfg.get("executor")
    settings = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings or {})
    kind = settings.pop("kind", "serial")
    if kind == "serial":
        return SerialExecutor(problem)
    if kind == "ray":
        unknown = set(settings) - EXECUTOR_KEYS
        if unknown:
            raise SearchError(f"executor=ray has no setting {min(unknown)!r}; known: {sorted(EXECUTOR_KEYS)}")
        started = time.perf_counter()
        executor = RayExecutor(problem_factory, **settings)
        print(f"ray executor: {executor.workers} workers ready in {time.perf_counter() - started:.1f} s")
        return executor
    raise SearchError(f"executor.kind={kind!r}: use 'serial' or 'ray'")
