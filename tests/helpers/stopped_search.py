"""tests/helpers/crash_search.py's traced micro-zoo search in a forked child that a test stops the way a scheduler
does: SIGTERM or SIGUSR2 where nothing else handles them, or SIGUSR2 under submitit's own handlers in a job that has
timed out once too often. The child's exit status says how it ended (0: the search finished; 128 + the signal's
number: Interrupted, as the CLI exits; 3: another exception), and the name of what ended it is written beside the run
directory (`<run_dir>.stopped_by`). Each evaluation starts with a short pause, so a signal sent when its trace line
appears lands inside it even on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from evomerge.eval.evaluator import Evaluator
from evomerge.search.run import Interrupted
from tests.helpers import crash_search

EVALUATION_PAUSE = 0.2  # seconds

ERRORS = "child_errors.txt"  # beside the run directory: the tracebacks of the children that did not finish


def start(run_dir: Path, trace: Path, home: Path, generations: int, submitit_job: bool = False) -> int:
    """Fork a child that runs (or resumes) the search; returns its pid."""
    trace.write_text("")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    for stop_signal in (signal.SIGTERM, signal.SIGUSR2):  # a job's process starts with the default handlers, not
        signal.signal(stop_signal, signal.SIG_DFL)  # those of whatever ran in this pytest process (Ray's driver)
    evaluate = Evaluator.evaluate
    Evaluator.evaluate = lambda *args, **kwargs: time.sleep(EVALUATION_PAUSE) or evaluate(*args, **kwargs)
    try:
        if submitit_job:
            submitit_out_of_requeues(run_dir.parent)
        crash_search.search(run_dir, trace, generations, home, slow=False)
    except BaseException as stop:  # the child never returns into pytest
        Path(f"{run_dir}.stopped_by").write_text(type(stop).__name__)
        with open(run_dir.parent / ERRORS, "a") as handle:
            traceback.print_exc(file=handle)
        code = 128 + stop.signum if isinstance(stop, Interrupted) else 3
    os._exit(code)


def submitit_out_of_requeues(folder: Path) -> None:
    """The signal handlers submitit's process_job installs in a SLURM job, for a job that cannot be requeued again:
    its SIGUSR2 handler raises UncompletedJobError wherever the job happens to be."""
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    delayed = DelayedSubmission(print)  # no checkpoint() to requeue with
    delayed.set_timeout(timeout_min=1, max_num_timeout=0)  # a minute: past its guaranteed time from the start
    SlurmJobEnvironment()._handle_signals(JobPaths(folder, job_id="0"), delayed)


def wait_for_phase(trace: Path, phase: str, occurrence: int, pid: int) -> None:
    """Until the child's trace shows the phase's `occurrence`-th start."""
    while trace.read_text().splitlines().count(phase) < occurrence:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        assert finished == 0, f"the search ended before its {phase} #{occurrence}"
        time.sleep(0.0005)


def finish(pid: int) -> int:
    """The child's exit status once it ends."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def entries(run_dir: Path) -> list[dict]:
    """The log without the `seconds` timings (the only field that differs between runs)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").exists() else []
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def errors(folder: Path) -> str:
    """The tracebacks the children of runs in `folder` wrote, if any."""
    return (folder / ERRORS).read_text() if (folder / ERRORS).exists() else "(no traceback)"
