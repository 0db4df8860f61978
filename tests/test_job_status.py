"""Honest job status for a scheduler: a stop signal (SIGTERM, SIGUSR2, submitit's final timeout) is never logged as
a failed candidate and the run resumes to the uninterrupted result; the sweep summary lists every job -- done, failed,
killed -- and survives a killed job, and the sweep exits non-zero; a failed job that submitit runs exits 1 (FAILED in
sacct); progress bars only on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.search.run import Interrupted, Outcome, Progress, evaluate_safely, load_checkpoint
from tests.helpers import stopped_search

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS = 3
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="searches are forked")


class Raises:
    """A problem whose evaluation raises `error`."""

    objectives = ("score",)

    def __init__(self, error: BaseException):
        self.error = error

    def evaluate(self, recipe):
        raise self.error


def test_evaluate_safely_lets_a_scheduler_stop_through_and_logs_a_candidates_error():
    UncompletedJobError = pytest.importorskip("submitit.core.utils").UncompletedJobError

    final_timeout = UncompletedJobError("Job not requeued because: timed-out too many times.")
    for stop in (Interrupted(signal.SIGTERM), final_timeout):
        with pytest.raises(type(stop)):
            evaluate_safely(Raises(stop), recipe=None)
    assert evaluate_safely(Raises(RuntimeError("bad merge")), recipe=None) == Outcome({}, {}, "RuntimeError: bad merge")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()], ids=["terminal", "log file"])
def test_progress_is_a_bar_on_a_terminal_and_a_line_per_generation_elsewhere(monkeypatch, stream):
    monkeypatch.setattr(sys, "stderr", stream)
    state = {"generation": 0, "evaluations": 0, "elapsed_seconds": 0.0, "best": None, "history": []}
    with Progress(3, 0, enabled=True) as shown:
        for generation, told in ((1, {"genomes": [[0.5]] * 4, "answers": 40}),  # the second on workers, a quarter idle
                                 (2, {"genomes": [[0.5]] * 4, "answers": 20, "idle_share": 0.25})):
            state["history"].append(told)
            state.update(generation=generation, evaluations=4 * generation, elapsed_seconds=1.0 * generation,
                         best={"fitness": [0.25 * generation]})
            shown.update(state)
    text = stream.getvalue()
    if isinstance(stream, Terminal):
        assert "\r" in text and "search:" in text and "2/3" in text  # tqdm redraws its bar
    else:
        assert text.splitlines() == ["search: generation 1/3, 4 evaluations, best 0.250, 10 rows scored per candidate, 1s",
                                     "search: generation 2/3, 8 evaluations, best 0.500, 5 rows scored per candidate, 2s, "
                                     "workers idle 25% at the barrier"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_zoo_home) -> Path:
    root = tmp_path_factory.mktemp("reference")
    pid = stopped_search.start(root / "run", root / "trace", micro_zoo_home, GENERATIONS)
    assert stopped_search.finish(pid) == 0, stopped_search.errors(root)
    return root / "run"


# (signal, under submitit's handlers of a job out of requeues, the child's exit status, what ended it)
STOPS = [("SIGTERM", False, 128 + signal.SIGTERM, "Interrupted"),
         ("SIGUSR2", False, 128 + signal.SIGUSR2, "Interrupted"),
         ("SIGUSR2", True, 3, "UncompletedJobError")]


def test_a_scheduler_stop_mid_evaluation_is_no_failed_candidate_and_the_run_resumes_to_the_same_result(
        tmp_path, reference, micro_zoo_home):
    pytest.importorskip("submitit")
    run_dir, trace = tmp_path / "run", tmp_path / "trace"
    expected = stopped_search.entries(reference)
    for occurrence, (name, submitit_job, code, stopped_by) in enumerate(STOPS, start=2):
        pid = stopped_search.start(run_dir, trace, micro_zoo_home, GENERATIONS, submitit_job)
        stopped_search.wait_for_phase(trace, "eval", occurrence, pid)
        os.kill(pid, getattr(signal, name))
        status = stopped_search.finish(pid)
        assert status == code, f"{name}: the child exited {status}, not {code}\n{stopped_search.errors(tmp_path)}"
        assert trace.read_text().splitlines()[-1] == "eval"  # it landed in a candidate's evaluation
        assert Path(f"{run_dir}.stopped_by").read_text() == stopped_by
        logged = stopped_search.entries(run_dir)
        assert logged == expected[:len(logged)], f"{name}: the log is not the uninterrupted run's: {logged[-1]}"
    assert stopped_search.finish(stopped_search.start(run_dir, trace, micro_zoo_home, GENERATIONS)) == 0
    assert stopped_search.entries(run_dir) == expected
    assert (run_dir / "best_recipe.yaml").read_text() == (reference / "best_recipe.yaml").read_text()
    assert load_checkpoint(run_dir)["history"] == load_checkpoint(reference)["history"]


def start_cli(tmp_path: Path, *arguments: str) -> subprocess.Popen:
    """`evomerge <arguments>` in a process of its own, its output in files (not a terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *arguments], cwd=tmp_path, env=env,
                                stdout=stdout, stderr=stderr)


def output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def job(sweep: Path, num: int) -> dict:
    path = sweep / ".jobs" / f"{num}.json"
    return json.loads(path.read_text()) if path.exists() else {"status": None}


def wait_until(condition, process: subprocess.Popen, what: str, tmp_path: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the sweep ended before {what}:\n{output(tmp_path)[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def mid_search(sweep: Path, num: int) -> bool:
    """Job `num` is running and has checkpointed a generation: it is inside its search loop."""
    record = job(sweep, num)
    if record["status"] != "running":
        return False
    state = load_checkpoint(Path(record["run_dir"])) if (Path(record["run_dir"]) / "checkpoint.json").exists() else None
    return state is not None and state["generation"] >= 1


# a good run (one generation), a bad setting, a run long enough to be stopped mid-search
SWEEP = ("search", "-m", "zoo=micro", "search.popsize=4", "search.generations=1,bad,300")


def summary(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_summary.json").read_text())


def check_summary(sweep: Path, stdout: str, killed_because: str) -> None:
    rows = summary(sweep)
    assert [row["status"] for row in rows] == ["done", "failed", "killed"]
    assert rows[0]["test"] is not None and "search.generations='bad': expected an integer" in rows[1]["error"]
    assert killed_because in rows[2]["error"]
    table = (sweep / "sweep_summary.md").read_text()
    assert "3 runs (1 done, 1 failed, 1 killed)" in table
    assert "| 0 | done | search.generations=1 |" in table and "](0) |" in table
    assert "| 1 | failed: search.generations='bad': expected an integer" in table
    assert "| 2 | killed: " in table and killed_because in table
    assert table in stdout and "2 of 3 runs failed or did not finish" in stdout  # printed as the sweep ended


@pytest.mark.slow  # a sweep of three micro-zoo jobs: a few minutes on 2 cores
def test_a_local_sweep_stopped_by_sigterm_lists_its_done_failed_and_killed_jobs_and_exits_for_requeue(
        tmp_path, micro_zoo_home):
    sweep = tmp_path / "sweep"
    process = start_cli(tmp_path, *SWEEP, f"home={micro_zoo_home}", f"hydra.sweep.dir={sweep}")
    wait_until(lambda: job(sweep, 0)["status"] == "running", process, "job 0 running", tmp_path)
    assert job(sweep, 2)["status"] == "pending"  # listed from the start of the sweep: the jobs run one by one
    assert "| 2 | pending | search.generations=300 |" in (sweep / "sweep_summary.md").read_text()
    wait_until(lambda: mid_search(sweep, 2), process, "job 2 in its search", tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stdout, stderr = output(tmp_path)
    assert (f"evomerge search: stopped by SIGTERM; the run resumes from its last checkpoint: "
            f"evomerge search resume={sweep / '2'}") in stderr
    check_summary(sweep, stdout, "its process exited before the job ended")
    assert "search: generation 1/1, 4 evaluations, best " in stderr and "\r" not in stderr  # no bars in a log file


@pytest.mark.slow  # three micro-zoo jobs in joblib workers: a few minutes on 2 cores
def test_a_sweep_survives_a_killed_job_and_lists_every_job_with_its_state(tmp_path, micro_zoo_home):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    process = start_cli(tmp_path, *SWEEP, "hydra/launcher=joblib_local", "hydra.launcher.n_jobs=3",
                        f"home={micro_zoo_home}", f"hydra.sweep.dir={sweep}")
    wait_until(lambda: job(sweep, 0)["status"] == "done" and mid_search(sweep, 2), process, "job 0 done, job 2 in its "
               "search", tmp_path)
    worker = job(sweep, 2)["pid"]
    assert worker != process.pid  # a joblib worker of its own
    os.kill(worker, signal.SIGKILL)
    assert process.wait(timeout=300) == 1  # the launcher raised for the dead worker; the summary is printed anyway
    check_summary(sweep, output(tmp_path)[0], f"pid {worker}) is gone")


@pytest.mark.slow  # a submitit job: three Python processes start (about a minute on 2 cores)
def test_a_failed_job_that_submitit_runs_exits_1_so_the_scheduler_records_it_failed(tmp_path, micro_zoo_home):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    process = start_cli(tmp_path, "search", "-m", "hydra/launcher=submitit_local", "zoo=micro",
                        f"home={micro_zoo_home}", "search.generations=bad", f"hydra.sweep.dir={sweep}")
    assert process.wait(timeout=600) == 1
    stdout, stderr = output(tmp_path)
    assert "has not produced any output" in stderr  # the submitting side: the job process did not complete
    [row] = summary(sweep)
    assert row["status"] == "failed" and "search.generations='bad'" in row["error"]
    assert "| 0 | failed: search.generations='bad'" in stdout
    out_log, err_log = (Path(log) for log in row["logs"])
    assert "exiting 1 so the scheduler records it" in err_log.read_text()
    # the job again, as SLURM's srun runs it (python -m submitit.core._submit <folder>): its exit status is the job's
    folder = out_log.parent
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": folder.name,
           "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NTASKS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rerun = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(folder)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert summary(sweep)[0]["status"] == "failed"
