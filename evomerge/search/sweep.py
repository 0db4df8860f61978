"""The state of a Hydra multirun (`evomerge search -m search.seed=0,1,2 merge=ties,dare_ties`): one row per job with
its state (pending, running, done, failed, killed), overrides, best search score and test score, and links to its
run directory and log, written to the sweep directory as `sweep_summary.json` and `sweep_summary.md`.

`SweepSummary` is a Hydra callback (evomerge/conf/config.yaml, `hydra.callbacks`). Jobs may run in other processes
(joblib workers, SLURM nodes), so the state lives in files: one small status file per job in `<sweep dir>/.jobs/`,
replaced atomically at each change, and the summary is rebuilt from them by whichever process made the change:
- the sweep starts (`on_multirun_start`, the submitting process): every job, pending;
- a job starts (`on_job_start`, wherever it runs): running, with its host, process id and log;
- it ends (`on_job_end`): done, or failed and why;
- its process exits before the job ended (an interrupt, a requeue, Ctrl-C): killed, as that process exits; a
  process gone without a word (SIGKILL, out of memory) reads as killed where its host can be checked.
At the end (`on_multirun_end`) the summary is printed and the sweep exits 1 if a job did not finish; a sweep that
Hydra stops early (a launcher raising for a crashed or killed job) prints it as the process exits. A failed job that
a scheduler runs in a process of its own (hydra-submitit-launcher) exits 1, so the scheduler records it as failed.
A run's results are read from its `report.json`, in the run directory: the job's own directory, or `resume=<dir>`.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

JOBS_DIR = ".jobs"
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"
HIDDEN_OVERRIDES = ("command=",)  # set by the CLI for every job
_JOB_SWEEPS: set[Path] = set()  # sweeps this process has run jobs of
_OPEN_SWEEPS: set[Path] = set()  # sweeps this process launched whose end Hydra has not reached yet


@dataclass(frozen=True)
class JobError:
    """What a command returns in a multirun when it stopped on a user error (the CLI prints the message), so the
    other runs of the sweep go on and the summary lists this one as failed."""

    message: str


def run_directory(config: DictConfig) -> Path:
    """Where a job's run lives: `resume=<dir>` when given, else the job's output directory."""
    resume = OmegaConf.select(config, "resume", default=None)
    return Path(str(resume)).expanduser().absolute() if resume else Path(config.hydra.runtime.output_dir)


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides in job-number order, as Hydra's basic sweeper launches them; None where that cannot be
    known up front (another sweeper, or a glob(...) sweep, which needs Hydra's config loader)."""
    if not str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith(".BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except HydraException:
        return None
    return [list(job) for batch in batches for job in batch]


def _visible(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(HIDDEN_OVERRIDES)]


def _runs_alone(config: DictConfig) -> bool:
    """Whether a scheduler runs this job in a process of its own whose exit status is the job's (hydra-submitit-
    launcher: one SLURM job each). Its launcher hands the job's result back without raising, so that process would
    exit 0 -- COMPLETED in sacct -- for a failed job too."""
    return "hydra_submitit_launcher" in str(OmegaConf.select(config, "hydra.launcher._target_", default=""))


def _logs(config: DictConfig) -> list[str]:
    """The job's log files: submitit's stdout and stderr where it runs the job, else Hydra's job log (if any)."""
    if _runs_alone(config):
        import submitit  # the job runs under submitit: installed and loaded

        paths = submitit.JobEnvironment().paths
        candidates = [paths.stdout, paths.stderr]
    else:
        candidates = [Path(config.hydra.runtime.output_dir) / f"{config.hydra.job.name}.log"]
    return [str(Path(path).absolute()) for path in candidates if Path(path).exists()]


def job_record(config: DictConfig, status: str, error: str | None = None) -> dict[str, Any]:
    """One job as it starts or ends: number, overrides, state, run directory, logs, and the process running it."""
    return {"num": int(config.hydra.job.num), "overrides": _visible(config.hydra.overrides.task), "status": status,
            "error": error, "run_dir": str(run_directory(config)), "logs": _logs(config),
            "host": socket.gethostname(), "pid": os.getpid()}


def _ended(job_return: JobReturn) -> tuple[str, str | None]:
    """done, or failed and why: the command raised, or returned the JobError of a user error."""
    if job_return.status == JobStatus.FAILED:
        return "failed", _one_line(job_return._return_value)
    if isinstance(job_return._return_value, JobError):
        return "failed", job_return._return_value.message
    return "done", None


def _one_line(value: Any) -> str:
    text = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
    return text.strip().splitlines()[0] if text.strip() else type(value).__name__


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one; writers on other hosts or processes use their own temp files."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_job(sweep_dir: Path, record: Mapping[str, Any]) -> None:
    jobs = sweep_dir / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    _write_atomic(jobs / f"{record['num']}.json", json.dumps(record, ensure_ascii=False))


def _job_texts(sweep_dir: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted((sweep_dir / JOBS_DIR).glob("*.json"))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that id
        return True
    return True


def settled(job: Mapping[str, Any]) -> dict[str, Any]:
    """A running job whose process is gone was killed (checked on its own host; elsewhere it reads as running)."""
    if job["status"] == "running" and job["host"] == socket.gethostname() and not _alive(job["pid"]):
        return {**job, "status": "killed", "error": f"its process ({job['host']} pid {job['pid']}) is gone"}
    return dict(job)


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    return sorted((json.loads(text) for text in _job_texts(sweep_dir).values()), key=lambda job: job["num"])


def summary_rows(jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each job with its best search score and test score, read from the run's report.json once it is done."""
    rows = []
    for job in jobs:
        row = {**job, "best_search": None, "test": None, "best_baseline_test": None, "vs_best_baseline": None}
        if job["status"] == "done":
            try:
                report = json.loads((Path(job["run_dir"]) / "report.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                report = None
            if isinstance(report, dict):
                row.update(_scores(report))
            else:
                row.update(status="failed", error=f"no readable report.json in {job['run_dir']}")
        rows.append(row)
    return rows


def _scores(report: Mapping[str, Any]) -> dict[str, Any]:
    rows = report.get("rows") or []
    search = report.get("search") or {}
    best = [r for r in rows if r.get("kind") not in ("source", "baseline")]
    baselines = [r for r in rows if r.get("kind") == "baseline"]
    top = max(baselines, key=lambda r: r["metrics"]["fitness"]) if baselines else None
    paired = next((p for p in report.get("paired", []) if best and top and p["model"] == best[-1]["name"]
                   and p["against"] == top["name"]), None)
    return {"best_search": search.get("best_search_fitness"), "test": best[-1]["metrics"]["fitness"] if best else None,
            "best_baseline_test": top["metrics"]["fitness"] if top else None, "vs_best_baseline": paired}


def format_summary(rows: Sequence[Mapping[str, Any]], sweep_dir: Path) -> str:
    """A Markdown table: the overrides that differ between runs in their column, those all runs share above; links
    relative to the sweep directory, where the table is written."""
    override_lists = [row["overrides"] for row in rows]
    shared = [o for o in override_lists[0] if all(o in other for other in override_lists)] if rows else []
    counts = Counter(row["status"] for row in rows)
    states = ", ".join(f"{counts[state]} {state}" for state in ("done", "failed", "killed", "running", "pending")
                       if counts[state])
    lines = [f"sweep {sweep_dir}: {len(rows)} runs" + (f" ({states})" if states else "")
             + (f", all with {' '.join(shared)}" if shared else ""), "",
             "| # | state | overrides | best search | test | best uniform (test) | test − best uniform [95% CI], McNemar p "
             "| run directory | log |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        varying = " ".join(o for o in row["overrides"] if o not in shared) or "(none)"
        state = row["status"]
        if state == "running":
            state = f"running on {row['host']} (pid {row['pid']})"
        elif row.get("error"):
            state = f"{state}: {row['error']}"
        run = _link(_relative(row["run_dir"]), row["run_dir"], sweep_dir) if row.get("run_dir") else ""
        logs = " ".join(_link(Path(log).suffix.lstrip(".") or "log", log, sweep_dir) for log in row.get("logs", []))
        paired = row.get("vs_best_baseline")
        versus = (f"{paired['difference']:+.3f} [{paired['ci95'][0]:+.3f}, {paired['ci95'][1]:+.3f}], "
                  f"p={paired['mcnemar_p']:.3g}") if paired else ""
        cells = [str(row["num"]), state.replace("|", "\\|"), varying, _number(row["best_search"]),
                 _number(row["test"]), _number(row["best_baseline_test"]), versus, run, logs]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _link(label: str, path: str, sweep_dir: Path) -> str:
    try:
        target = os.path.relpath(path, sweep_dir)
    except ValueError:  # another drive
        target = path
    return f"[{label}]({target})"


def _relative(path: str) -> str:
    """Relative to the working directory where that is shorter (outputs/...), else as it is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith("..") else relative


def write_summary(sweep_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Rebuild the summary from the job files, again if one changed meanwhile: processes write it concurrently,
    and the last to write has then seen every change before its own."""
    while True:
        texts = _job_texts(sweep_dir)
        rows = summary_rows(sorted((settled(json.loads(text)) for text in texts.values()), key=lambda r: r["num"]))
        text = format_summary(rows, sweep_dir)
        _write_atomic(sweep_dir / SUMMARY_JSON, json.dumps(rows, indent=2, ensure_ascii=False))
        _write_atomic(sweep_dir / SUMMARY_MD, text + "\n")
        if _job_texts(sweep_dir) == texts:
            return rows, text


def print_summary(sweep_dir: Path) -> int:
    """Print the summary; returns how many runs did not finish well (failed, killed, still pending or running)."""
    rows, text = write_summary(sweep_dir)
    print(f"\n{text}\n\nsummary: {sweep_dir / SUMMARY_MD}")
    unfinished = [row for row in rows if row["status"] != "done"]
    if unfinished:
        print(f"{len(unfinished)} of {len(rows)} runs failed or did not finish", flush=True)
    return len(unfinished)


def _mark_cut_short(sweep_dir: Path) -> None:
    """This process is exiting: a job it was running did not reach its end."""
    mine = [job for job in read_jobs(sweep_dir) if job["status"] == "running"
            and (job["host"], job["pid"]) == (socket.gethostname(), os.getpid())]
    for job in mine:
        write_job(sweep_dir, {**job, "status": "killed", "error": "its process exited before the job ended"})
    if mine:
        write_summary(sweep_dir)


@atexit.register
def _at_exit() -> None:
    """As this process exits: its jobs still running were cut short, and a sweep it launched whose end Hydra never
    reached (a launcher raised for a crashed or killed job) still prints its summary."""
    for sweep_dir in _JOB_SWEEPS:
        if (sweep_dir / JOBS_DIR).is_dir():
            _mark_cut_short(sweep_dir)
    for sweep_dir in _OPEN_SWEEPS:
        if (sweep_dir / JOBS_DIR).is_dir():
            print_summary(sweep_dir)


class SweepSummary(Callback):
    """Hydra callback: the sweep's job files and summary table (see the module's doc)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        (sweep_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (sweep_dir / JOBS_DIR).glob("*.json"):  # a sweep rerun in its directory starts afresh
            stale.unlink()
        for num, overrides in enumerate(sweep_jobs(config) or []):
            write_job(sweep_dir, {"num": num, "overrides": _visible(overrides), "status": "pending", "error": None,
                                  "run_dir": None, "logs": [], "host": None, "pid": None})
        write_summary(sweep_dir)
        _OPEN_SWEEPS.add(sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        write_job(sweep_dir, job_record(config, "running"))
        _JOB_SWEEPS.add(sweep_dir)
        write_summary(sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        status, error = _ended(job_return)
        write_job(sweep_dir, job_record(config, status, error))
        write_summary(sweep_dir)
        if status == "failed" and _runs_alone(config):
            if isinstance(job_return._return_value, BaseException):  # its launcher keeps the traceback to itself
                traceback.print_exception(job_return._return_value)
            print(f"evomerge: job {config.hydra.job.num} failed: {error}; exiting 1 so the scheduler records it",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)  # not an Exception: Hydra's run_job and submitit's process_job let it end the process

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        _OPEN_SWEEPS.discard(sweep_dir)
        if print_summary(sweep_dir):
            raise SystemExit(1)
