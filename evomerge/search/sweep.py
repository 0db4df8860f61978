"""The summary of a Hydra multirun (`evomerge search -m search.seed=0,1,2 merge=ties,dare_ties`): one row per run
with its overrides, best search score and test score, written to the sweep directory as `sweep_summary.json` and
`sweep_summary.md` and printed at the end.

`SweepSummary` is a Hydra callback (evomerge/conf/config.yaml, `hydra.callbacks`). Each job, wherever a launcher ran it
(this process, a joblib worker, a SLURM node), leaves `sweep_job.json` in its job directory (`on_job_end`) and
refreshes the summary from all jobs finished so far, so the table exists even if the sweep is cut short; at the end
of the sweep (`on_multirun_end`) the summary is written again and printed. A run's results are read from its
`report.json`, in the run directory: the job's own directory, or the one `resume=<dir>` names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

JOB_FILE = "sweep_job.json"
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"
HIDDEN_OVERRIDES = ("command=",)  # set by the CLI for every job


@dataclass(frozen=True)
class JobError:
    """What a command returns in a multirun when it stopped on a user error (the CLI prints the message), so the
    other runs of the sweep go on and the summary lists this one as failed."""

    message: str


def run_directory(config: DictConfig) -> Path:
    """Where a job's run lives: `resume=<dir>` when given, else the job's output directory."""
    resume = OmegaConf.select(config, "resume", default=None)
    return Path(str(resume)).expanduser().absolute() if resume else Path(config.hydra.runtime.output_dir)


def job_record(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """One job: its number, overrides, run directory, and whether it finished (and if not, why)."""
    status, error = "ok", None
    if job_return.status == JobStatus.FAILED:
        status, error = "failed", _one_line(job_return._return_value)
    elif isinstance(job_return._return_value, JobError):
        status, error = "failed", job_return._return_value.message
    overrides = [o for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
                 if not o.startswith(HIDDEN_OVERRIDES)]
    return {"num": int(config.hydra.job.num), "overrides": overrides, "run_dir": str(run_directory(config)),
            "status": status, "error": error}


def _one_line(value: Any) -> str:
    text = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
    return text.strip().splitlines()[0] if text.strip() else type(value).__name__


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for path in sweep_dir.glob(f"*/{JOB_FILE}"):
        try:
            jobs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):  # a job writing it right now: the final summary reads it again
            continue
    return sorted(jobs, key=lambda job: job["num"])


def summary_rows(jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each job with its best search score and test score, read from the run's report.json."""
    rows = []
    for job in jobs:
        row = {**job, "best_search": None, "test": None, "best_baseline_test": None}
        report_path = Path(job["run_dir"]) / "report.json"
        if job["status"] == "ok":
            try:
                report = json.loads(report_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                report = None
            if isinstance(report, dict):
                row.update(_scores(report))
            elif job["error"] is None:
                row["error"] = f"no readable report.json in {job['run_dir']}"
        rows.append(row)
    return rows


def _scores(report: Mapping[str, Any]) -> dict[str, Any]:
    rows = report.get("rows") or []
    search = report.get("search") or {}
    best = [r["metrics"]["fitness"] for r in rows if r.get("kind") not in ("source", "baseline")]
    baselines = [r["metrics"]["fitness"] for r in rows if r.get("kind") == "baseline"]
    return {"best_search": search.get("best_search_fitness"), "test": best[-1] if best else None,
            "best_baseline_test": max(baselines) if baselines else None}


def format_summary(rows: Sequence[Mapping[str, Any]], sweep_dir: Path) -> str:
    """A Markdown table: the overrides that differ between runs in the first column, those all runs share above."""
    override_lists = [row["overrides"] for row in rows]
    shared = [o for o in override_lists[0] if all(o in other for other in override_lists)] if rows else []
    lines = [f"sweep {sweep_dir}: {len(rows)} runs" + (f", all with {' '.join(shared)}" if shared else ""), "",
             "| # | overrides | best search | test | best uniform (test) | run directory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        varying = " ".join(o for o in row["overrides"] if o not in shared) or "(none)"
        cells = [_number(row["best_search"]), _number(row["test"]), _number(row["best_baseline_test"])]
        if row["status"] != "ok" or row.get("error"):
            cells[1] = f"failed: {row['error']}".replace("|", "\\|")
        lines.append(f"| {row['num']} | {varying} | {' | '.join(cells)} | {_relative(row['run_dir'])} |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _relative(path: str) -> str:
    """Relative to the working directory where that is shorter (outputs/...), else as it is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith("..") else relative


def write_summary(sweep_dir: Path) -> tuple[list[dict[str, Any]], str]:
    rows = summary_rows(read_jobs(sweep_dir))
    text = format_summary(rows, sweep_dir)
    for name, content in ((SUMMARY_JSON, json.dumps(rows, indent=2, ensure_ascii=False)), (SUMMARY_MD, text + "\n")):
        tmp = sweep_dir / f".{name}.{os.getpid()}.tmp"  # one writer per job process: no shared temp file
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, sweep_dir / name)
    return rows, text


class SweepSummary(Callback):
    """Hydra callback: the sweep summary table (see the module's doc)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        record = job_record(config, job_return)
        tmp = job_dir / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, job_dir / JOB_FILE)
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows, text = write_summary(sweep_dir)
        print(f"\n{text}\n\nsummary: {sweep_dir / SUMMARY_MD}")
        failed = [row for row in rows if row["status"] != "ok" or row.get("error")]
        if failed:
            print(f"{len(failed)} of {len(rows)} runs failed", flush=True)
            raise SystemExit(1)
