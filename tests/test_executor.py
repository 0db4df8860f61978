"""Executors: the Ray executor on a local 2-worker Ray cluster gives the serial executor's log and held-out rows,
retries a candidate whose worker died and fails it (never drops it) when its worker keeps dying, and leaves the pool
to the workers; its settings (GPUs per worker, CPUs, popsize) are checked before anything loads."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from evomerge.cli import main
from evomerge.pool import resolve_pool
from evomerge.resources import CONF_MODULE
from evomerge.search import ps
from evomerge.search.command import search, stage
from evomerge.search.executor import RayExecutor, available_cpus, executor_settings, make_executor, popsize_warning
from evomerge.search.optimizer import CMAES
from evomerge.search.run import Budget, SearchError, SerialExecutor, run_search
from tests.helpers.synthetic_search import SyntheticProblem
from tests.test_racing import RowProblem, race, raced_search

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class ErrorProneProblem(SyntheticProblem):
    """The synthetic problem with other failing candidates: those whose second value is above 0.5."""

    safe_limit = 1.0

    def __init__(self):
        super().__init__(None)

    def evaluate(self, recipe):
        if recipe.values[1] > 0.5:
            raise ValueError("second value too high")
        return super().evaluate(recipe)


def failing_factory():
    raise RuntimeError("the pool is not there")


@pytest.fixture(scope="module")
def local_cluster():
    """One local Ray instance with 2 CPUs for the module; executors join it and leave it running. Its workers
    import this module (the problems below) and tests.helpers by name, as pytest does."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _lines(run_dir: Path, drop=("seconds",)) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _synthetic_search(run_dir: Path, executor, generations: int = 5) -> None:
    problem = ErrorProneProblem()
    run_search(run_dir, problem, lambda: CMAES(4, seed=3, popsize=6), {"problem": "synthetic"},
               Budget(generations), executor=executor or SerialExecutor(problem), progress=False)


def test_ray_workers_give_the_serial_log(local_cluster, tmp_path):
    _synthetic_search(tmp_path / "serial", None)
    executor = RayExecutor(ErrorProneProblem, workers=2)
    try:
        assert len(set(executor.pids)) == 2 and os.getpid() not in executor.pids
        _synthetic_search(tmp_path / "ray", executor)
        assert 0 <= executor.idle_share < 1  # of the last generation: 6 candidates on 2 workers
        history = json.loads((tmp_path / "ray" / "checkpoint.json").read_text())["history"]
        assert len(history) == 5 and all(0 <= told["idle_share"] < 1 for told in history)  # recorded per generation
        recipes = [ErrorProneProblem().decode(np.array([0.1 * i, 0.2, 0.3, 0.4])) for i in range(5)]
        rows = executor.report(recipes)  # held-out rows run on the workers, in order
    finally:
        executor.close()
    serial, parallel = (tmp_path / "serial" / "log.jsonl").read_text(), (tmp_path / "ray" / "log.jsonl").read_text()
    assert parallel == serial and len(serial.splitlines()) == 30  # fixed timings: the whole log is the same
    assert any(json.loads(line)["error"] for line in serial.splitlines())  # failing candidates come back in place
    assert (tmp_path / "ray" / "best_recipe.yaml").read_text() == (tmp_path / "serial" / "best_recipe.yaml").read_text()
    serial_rows = SerialExecutor(ErrorProneProblem()).report(recipes)
    assert [{k: v for k, v in row.items() if k != "pid"} for row in rows] == \
        [{k: v for k, v in row.items() if k != "pid"} for row in serial_rows]
    assert {row["pid"] for row in rows} <= set(executor.pids) and os.getpid() not in {row["pid"] for row in rows}


class DyingProblem(SyntheticProblem):
    """Kills its own worker process (SIGKILL) on recipes whose first value is above 0.5: `deaths` times for a
    recipe -- counted in marker files, so that a new worker knows -- or every time when the second value is 0.9.
    No candidate fails otherwise (no safe region)."""

    safe_limit = 1.0

    def __init__(self, markers: str, deaths: int = 1):
        super().__init__(None)
        self.markers, self.deaths = Path(markers), deaths

    def evaluate(self, recipe):
        if recipe.values[0] > 0.5:
            died = len(list(self.markers.glob(f"{recipe.hash}.*")))
            if died < self.deaths or recipe.values[1] == 0.9:
                (self.markers / f"{recipe.hash}.{died}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(recipe)


@pytest.mark.slow  # each death costs a new worker process: ~30 s in all on 2 cores
def test_a_candidate_whose_worker_died_is_retried_and_failed_when_it_keeps_dying(local_cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    problem = SyntheticProblem(None)
    problem.safe_limit = DyingProblem.safe_limit  # the serial reference fails nothing either
    values = [(0.1, 0.2), (0.8, 0.2), (0.2, 0.2), (0.7, 0.9), (0.3, 0.2)]  # #1 dies once, #3 every time
    recipes = [problem.decode(np.array([a, b, 0.3, 0.4])) for a, b in values]
    executor = RayExecutor(functools.partial(DyingProblem, str(markers)), workers=2, max_retries=1)
    try:
        outcomes = list(executor.map(recipes))
        replaced = executor.replaced
    finally:
        executor.close()
    serial = list(SerialExecutor(problem).map(recipes))
    assert len(outcomes) == 5 and [o for i, o in enumerate(outcomes) if i != 3] == [o for i, o in enumerate(serial) if i != 3]
    assert outcomes[1].error is None  # retried on a new worker, which did not die
    assert outcomes[3].metrics == {} and "worker evaluating this candidate died 2 times" in outcomes[3].error
    assert replaced == 3 and len(list(markers.iterdir())) == 3  # #1 once, #3 on its try and its one retry


def test_a_raced_search_on_ray_workers_gives_the_serial_log(local_cluster, tmp_path):
    """fitness=racing on workers: every round sends the same rows to whichever worker is free."""
    raced_search(tmp_path / "serial", 3)
    executor = RayExecutor(RowProblem, workers=2)
    try:
        run_search(tmp_path / "ray", RowProblem(), lambda: CMAES(3, seed=2, popsize=8), {"problem": "rows"},
                   Budget(3), executor=executor, race=race(parents=4), progress=False)
    finally:
        executor.close()
    assert _lines(tmp_path / "ray") == _lines(tmp_path / "serial")
    assert any(not line["confirmed"] for line in _lines(tmp_path / "ray"))


def test_a_worker_that_cannot_build_the_problem_stops_the_search_with_its_error(local_cluster):
    with pytest.raises(SearchError, match="could not build the search problem.*the pool is not there"):
        RayExecutor(failing_factory, workers=1)


def test_a_failing_held_out_row_stops_the_report_with_its_error(local_cluster):
    executor = RayExecutor(ErrorProneProblem, workers=1)
    try:
        with pytest.raises(SearchError, match="held-out report row could not be evaluated: .*second value too high"):
            executor.report([ErrorProneProblem().decode(np.array([0.1, 0.9, 0.3, 0.4]))])
    finally:
        executor.close()


def ray_settings(device: str, **executor) -> dict:
    return executor_settings(OmegaConf.create({"device": device, "executor": {"kind": "ray", **executor}}))[1]


def test_num_gpus_follows_the_device_and_a_mismatch_is_refused_before_anything_loads():
    assert ray_settings("cuda", workers=4, num_gpus=None)["num_gpus"] == 1
    assert ray_settings("cpu", workers=2, num_gpus=None)["num_gpus"] == 0
    assert ray_settings("cuda", num_gpus=0.5)["num_gpus"] == 0.5  # two workers share a GPU: asked for, allowed
    with pytest.raises(SearchError, match="num_gpus=0 with device=cuda: every Ray worker would load its pool onto GPU 0"):
        ray_settings("cuda", num_gpus=0)
    with pytest.raises(SearchError, match="num_gpus=1 with device=cpu"):
        ray_settings("cpu", num_gpus=1)
    with pytest.raises(SearchError, match="device=cuda:1 with executor=ray"):
        ray_settings("cuda:1", num_gpus=1)
    with pytest.raises(SearchError, match=r"executor.workers=0: need at least one worker"):
        ray_settings("cpu", workers=0)


def test_cpu_counts_come_from_the_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus() == 1


def test_a_popsize_that_leaves_workers_idle_is_named_with_the_popsizes_that_fill_them():
    assert popsize_warning(8, 4) is None and popsize_warning(3, 1) is None
    assert popsize_warning(10, 4) == ("search.popsize=10 on 4 workers leaves 17% of worker time idle in each "
                                      "generation's last wave; popsize 8 or 12 fills them")
    assert popsize_warning(3, 4) == ("search.popsize=3 on 4 workers leaves 25% of worker time idle in each "
                                     "generation's last wave; popsize 4 fills them")


def test_make_executor_reads_the_executor_group():
    problem = SyntheticProblem(None)
    assert isinstance(make_executor(OmegaConf.create({"executor": {"kind": "serial"}}), problem, None), SerialExecutor)
    assert isinstance(make_executor(OmegaConf.create({}), problem, None), SerialExecutor)
    with pytest.raises(SearchError, match="executor.kind='dask'"):
        make_executor(OmegaConf.create({"executor": {"kind": "dask"}}), problem, None)
    with pytest.raises(SearchError, match="no setting 'gpus'"):
        make_executor(OmegaConf.create({"executor": {"kind": "ray", "gpus": 1}}), problem, None)


@pytest.mark.slow  # two micro-zoo searches and two workers loading the pool: minutes on 2 cores
def test_ps_search_on_ray_workers_matches_the_serial_search(local_cluster, micro_zoo_home, tmp_path):
    common = ["zoo=micro", f"home={micro_zoo_home}", "progress=false", "search.popsize=4", "search.generations=2"]
    main(["search", *common, f"hydra.run.dir={tmp_path / 'serial'}"])
    main(["search", *common, f"hydra.run.dir={tmp_path / 'ray'}", "executor=ray", "executor.workers=2"])
    assert _lines(tmp_path / "ray") == _lines(tmp_path / "serial") and len(_lines(tmp_path / "serial")) == 8
    ray_seconds = [json.loads(line)["seconds"] for line in (tmp_path / "ray" / "log.jsonl").read_text().splitlines()]
    assert all(set(s) == {"merge", "eval"} for s in ray_seconds if s)
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("serial", "ray")]
    assert reports[0]["rows"] == reports[1]["rows"]


@pytest.mark.slow  # two workers loading the micro zoo's pool: a minute on 2 cores
def test_with_ray_workers_the_driver_never_loads_the_pool(local_cluster, micro_zoo_home, tmp_path):
    """The driver decodes genomes, tells CMA-ES and writes the log; the pool lives on the workers only, and the
    held-out report's rows are evaluated there too."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "zoo=micro", f"home={micro_zoo_home}", "progress=false",
                                           "search.popsize=2", "search.generations=1", "executor=ray",
                                           "executor.workers=2"])
    pool = resolve_pool(cfg)
    with stage(cfg, pool, ps, tmp_path) as (problem, make_optimizer, executor, tracker):
        result = search(cfg, pool, tmp_path, problem, make_optimizer, executor, tracker)
        rows = executor.report(ps.report_items(pool, problem.decode(np.asarray(result.best["genome"]))))
    assert problem._merger is None  # never loaded in this process
    assert [row["kind"] for row in rows] == ["source"] * 3 + ["baseline"] * 3 + ["best"]
    assert len(_lines(tmp_path)) == 2 and all(line["error"] is None for line in _lines(tmp_path))
