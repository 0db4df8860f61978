"""Where a generation's candidates are evaluated: in the search process (`executor=serial`, the default) or on Ray
actors (`executor=ray`), each of which builds the problem once -- the pool resident in its memory or on its GPU --
and evaluates recipes with `evaluate_safely`, exactly as the serial executor does.

`RayExecutor.map` keeps every actor busy (a candidate goes to whichever actor is free) and yields outcomes in the
order of the recipes it was given, so `run_search` writes the same log whichever executor ran it. A worker that dies
(killed, out of memory, its node lost) is replaced by a new actor and its candidate evaluated again, up to
`max_retries` times; after that the candidate is logged as failed with an error saying its worker died -- never
dropped. The held-out report's rows run on the actors too (`report`), in parallel, so with `executor=ray` the
driver never loads the pool: its problem only decodes genomes (the problems load their pool on first use).

On GPUs each actor gets its own GPU (`num_gpus` follows `device`, see `executor_settings`); each `map` records
the share of actor time idle at the generation's barrier (`idle_share`), and a popsize that leaves the last wave
of a generation part-empty is warned about with the popsizes that fill the workers.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
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
    Rows,
    SearchError,
    SerialExecutor,
    evaluate_safely,
)

ProblemFactory = Callable[[], Any]  # returns a Problem, or a (problem, make_optimizer) pair as ps.make_problem does


class _Worker:
    """One Ray actor: the problem built and its pool loaded once (under the driver's model-loading policy: an
    actor is a fresh process), then one recipe or held-out report row at a time."""

    def __init__(self, problem_factory: ProblemFactory, load_policy: LoadPolicy):
        set_load_policy(**dataclasses.asdict(load_policy))
        built = problem_factory()
        self.problem = built[0] if isinstance(built, tuple) else built
        self.problem.load()

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, job: tuple[Recipe, Rows | None]) -> Outcome:
        return evaluate_safely(self.problem, *job)

    def report_row(self, item: Any) -> dict[str, Any]:
        return self.problem.report_row(item)


class RayExecutor:
    """Candidates evaluated in parallel on `workers` Ray actors (`num_gpus` GPUs and `num_cpus` CPUs each).

    `address`: None starts a local Ray instance (stopped again by `close`), "auto" joins the cluster this machine is
    part of (`ray start --head` / `ray start --address=...`), or any address `ray.init` accepts. When Ray is already
    initialised in this process, that instance is used as it is. Settings are checked by `executor_settings`."""

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
        import ray

        self._ray = ray
        self.problem_factory = problem_factory
        self.max_retries = int(max_retries)
        self.workers = int(workers)
        self.idle_share: float | None = None  # of the last map: worker time idle at the generation's barrier
        self._started_ray = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
            if address is None:  # a local instance: room for every actor even where the allocation has fewer cores
                options["num_cpus"] = max(available_cpus(), int(workers * num_cpus + 0.999))
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

    def map(self, recipes: Sequence[Recipe], rows: Rows | None = None) -> Iterator[Outcome]:
        """Outcomes in the order of `recipes` (each on `rows` only, when given: a race's round, the same rows on
        every worker); an error past `evaluate_safely`, or a worker that died more than `max_retries` times, makes
        a failed candidate (logged, never dropped)."""
        jobs = [(recipe, rows) for recipe in recipes]
        yield from self._in_order("evaluate", jobs, "candidate", lambda why: Outcome({}, {}, why))

    def report(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        """The held-out report's rows, in parallel on the workers' resident pools; a row that fails ends it."""
        def refuse(why: str) -> dict[str, Any]:
            raise SearchError(f"a held-out report row could not be evaluated: {why}")

        return list(self._in_order("report_row", items, "report row", refuse))

    def _in_order(self, method: str, items: Sequence[Any], what: str, failed: Callable[[str], Any]) -> Iterator[Any]:
        """`method` of a free actor on each item (whichever actor is free), results yielded in the items' order.
        Records `idle_share`: 1 - busy actor time / (actors x time until the last result)."""
        ray = self._ray
        items = list(items)
        self.idle_share = None  # a generation served from the log and the cache leaves no idle time to measure
        queue = deque(range(len(items)))
        attempts = [0] * len(items)
        done: dict[int, Any] = {}
        running: dict[Any, tuple[int, int, float]] = {}  # object ref -> (item index, actor slot, dispatch time)
        idle = deque(range(len(self.actors)))
        following, started, busy, finished = 0, time.perf_counter(), 0.0, time.perf_counter()
        while following < len(items):
            while queue and idle:
                index, slot = queue.popleft(), idle.popleft()
                attempts[index] += 1
                running[getattr(self.actors[slot], method).remote(items[index])] = (index, slot, time.perf_counter())
            if following in done:
                yield done.pop(following)
                following += 1
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index, slot, dispatched = running.pop(ref)
                finished = time.perf_counter()
                busy += finished - dispatched
                try:
                    done[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # raised past evaluate_safely (not an Exception)
                    done[index] = failed(_last_line(error))
                except ray.exceptions.RayError as error:  # the actor's process is gone
                    self._replace(slot)
                    if attempts[index] <= self.max_retries:
                        queue.appendleft(index)  # again, first, on a free (or the new) actor
                    else:
                        done[index] = failed(f"WorkerDied: the Ray worker evaluating this {what} died "
                                             f"{attempts[index]} times ({type(error).__name__}: {error_line(error)})")
                idle.append(slot)
            self.idle_share = 1 - busy / (len(self.actors) * max(finished - started, 1e-9))

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


def available_cpus() -> int:
    """The CPUs this job may use -- its SLURM allocation or its affinity mask -- not the node's `os.cpu_count()`."""
    counts = [len(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else [os.cpu_count() or 1]
    counts += [int(os.environ[name]) for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")
               if os.environ.get(name, "").isdigit()]
    return min(counts)


EXECUTOR_KEYS = {"workers", "address", "num_gpus", "num_cpus", "max_retries", "startup_timeout_s"}
LIMITS = {"workers": (1, True, "need at least one worker"), "max_retries": (0, True, "must be 0 or more"),
          "num_gpus": (0, False, "must be 0 or more"), "num_cpus": (1e-9, False, "must be positive"),
          "startup_timeout_s": (1e-9, False, "must be positive (or null)")}


def executor_settings(cfg: DictConfig | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The executor's kind and settings, checked in one line each before any model is loaded, with `num_gpus`
    following the device: null gives each actor one GPU on `device=cuda` and none on the CPU. A GPU device with
    0 GPUs per actor is refused (Ray would leave CUDA_VISIBLE_DEVICES alone and every actor would load its pool
    onto GPU 0), as is `cuda:<index>` (Ray shows each actor only its own GPU, as cuda:0)."""
    select = (lambda key: OmegaConf.select(cfg, key)) if isinstance(cfg, DictConfig) else cfg.get
    settings = select("executor")
    settings = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings or {})
    kind = settings.pop("kind", "serial")
    if kind == "serial":
        return kind, {}
    if kind != "ray":
        raise SearchError(f"executor.kind={kind!r}: use 'serial' or 'ray'")
    unknown = set(settings) - EXECUTOR_KEYS
    if unknown:
        raise SearchError(f"executor=ray has no setting {min(unknown)!r}; known: {sorted(EXECUTOR_KEYS)}")
    if importlib.util.find_spec("ray") is None:
        raise SearchError("executor=ray needs Ray: pip install 'evomerge[ray]'")
    for key, (low, integer, what) in LIMITS.items():
        value = settings.get(key)
        if key not in settings or (value is None and key in ("startup_timeout_s", "num_gpus")):  # their defaults
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise SearchError(f"executor.{key}={value!r}: expected {'an integer' if integer else 'a number'}")
        if value < low:
            raise SearchError(f"executor.{key}={value}: {what}")
    device = str(select("device") or "cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu and device != "cuda":
        raise SearchError(f"device={device} with executor=ray: Ray shows each worker only the GPUs it gives it (as "
                          "cuda:0, ...); use device=cuda")
    if settings.get("num_gpus") is None:
        settings["num_gpus"] = 1 if on_gpu else 0
    elif on_gpu and settings["num_gpus"] == 0:
        raise SearchError("executor.num_gpus=0 with device=cuda: every Ray worker would load its pool onto GPU 0; "
                          "use executor.num_gpus=1 (one GPU per worker) or leave it null")
    elif not on_gpu and settings["num_gpus"] > 0:
        raise SearchError(f"executor.num_gpus={settings['num_gpus']} with device={device}: the workers would hold GPUs "
                          "and merge on the CPU; use device=cuda, or executor.num_gpus=0")
    return kind, settings


def popsize_warning(popsize: int, workers: int) -> str | None:
    """A generation is a barrier: a popsize that is no multiple of the workers leaves some idle in its last wave."""
    if popsize % workers == 0 or popsize < 1:
        return None
    waves = -(-popsize // workers)
    fill = sorted({workers * (waves - 1), workers * waves} - {0})
    return (f"search.popsize={popsize} on {workers} workers leaves {1 - popsize / (waves * workers):.0%} of worker "
            f"time idle in each generation's last wave; popsize {' or '.join(map(str, fill))} fills them")


def make_executor(cfg: DictConfig | Mapping[str, Any], problem: Problem, problem_factory: ProblemFactory) -> Executor:
    """The executor `cfg.executor` names: `serial` evaluates on `problem` in this process, `ray` on actors that
    each build their own problem with `problem_factory` (picklable: e.g. functools.partial(ps.make_problem, cfg,
    pool)) and load its pool, while `problem` here only decodes genomes. A config without an `executor` group is
    serial."""
    kind, settings = executor_settings(cfg)
    if kind == "serial":
        return SerialExecutor(problem)
    popsize = (OmegaConf.select(cfg, "search.popsize") if isinstance(cfg, DictConfig)
               else (cfg.get("search") or {}).get("popsize"))
    warning = popsize_warning(int(popsize), int(settings.get("workers", 2))) if popsize else None
    if warning:
        print(f"ray executor: warning: {warning}")
    started = time.perf_counter()
    executor = RayExecutor(problem_factory, **settings)
    print(f"ray executor: {executor.workers} workers ready in {time.perf_counter() - started:.1f} s")
    return executor
