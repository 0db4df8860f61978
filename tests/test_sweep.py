"""Sweeps: `evomerge search -m ...` through the CLI, one run directory per job, the summary table, resume inside a
multirun, a failed run that does not stop the others; the launcher configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from evomerge.cli import hydra_arguments, main
from evomerge.resources import CONF_MODULE
from evomerge.search.sweep import SUMMARY_JSON, SUMMARY_MD, format_summary, settled, summary_rows, sweep_jobs

MICRO = ["zoo=micro", "progress=false", "search.popsize=4"]


def test_hydra_flags_go_before_the_command_override():
    assert hydra_arguments("search", ["-m", "search.seed=0,1", "merge=ties"]) == [
        "-m", "command=search", "search.seed=0,1", "merge=ties"]
    assert hydra_arguments("search", ["a=1", "--multirun", "b=2"]) == ["--multirun", "command=search", "a=1", "b=2"]
    assert hydra_arguments("eval", ["--cfg", "job", "task=x"]) == ["--cfg", "job", "command=eval", "task=x"]
    assert hydra_arguments("zoo", ["--info", "searchpath"]) == ["--info", "searchpath", "command=zoo"]
    assert hydra_arguments("zoo", ["--info", "a=1"]) == ["--info", "all", "command=zoo", "a=1"]
    assert hydra_arguments("zoo", ["-i"]) == ["-i", "all", "command=zoo"]


def _report(best_search: float, test: float, baselines=(0.5, 0.6)) -> dict:
    rows = [{"name": "base", "kind": "source", "metrics": {"fitness": 0.1}}]
    rows += [{"name": f"b{i}", "kind": "baseline", "metrics": {"fitness": v}} for i, v in enumerate(baselines)]
    rows += [{"name": "best (search)", "kind": "best", "metrics": {"fitness": test}}]
    paired = [{"model": "best (search)", "against": f"b{i}", "kind": "baseline", "difference": round(test - v, 4),
               "ci95": [round(test - v - 0.05, 4), round(test - v + 0.05, 4)], "mcnemar_p": 0.0123, "better": 9,
               "worse": 2, "n": 40} for i, v in enumerate(baselines)]
    return {"split": "test", "rows": rows, "search": {"best_search_fitness": best_search}, "paired": paired}


def test_summary_rows_read_each_runs_report_and_the_table_shows_every_state(tmp_path):
    jobs = []
    for num, (overrides, report) in enumerate([(["search.seed=0", "merge=ties"], _report(0.81, 0.75)),
                                               (["search.seed=1", "merge=ties"], None)]):
        run_dir = tmp_path / str(num)
        run_dir.mkdir()
        if report:
            (run_dir / "report.json").write_text(json.dumps(report))
        jobs.append({"num": num, "overrides": overrides, "run_dir": str(run_dir), "status": "done", "error": None,
                     "logs": [str(run_dir / "cli.log")], "host": "node1", "pid": 10 + num})
    jobs.append({"num": 2, "overrides": ["search.seed=2", "merge=ties"], "run_dir": str(tmp_path / "2"),
                 "status": "failed", "error": "search.start='centre': use 'merge_defaults' or 'center'",
                 "logs": [], "host": "node1", "pid": 12})
    jobs.append({"num": 3, "overrides": ["search.seed=3", "merge=ties"], "run_dir": str(tmp_path / "3"),
                 "status": "running", "error": None, "logs": [], "host": "node7", "pid": 42})
    jobs.append({"num": 4, "overrides": ["search.seed=4", "merge=ties"], "run_dir": None, "status": "pending",
                 "error": None, "logs": [], "host": None, "pid": None})
    rows = summary_rows(jobs)
    assert (rows[0]["best_search"], rows[0]["test"], rows[0]["best_baseline_test"]) == (0.81, 0.75, 0.6)
    assert rows[1]["status"] == "failed" and rows[1]["test"] is None
    assert "no readable report.json" in rows[1]["error"]
    text = format_summary(rows, tmp_path)
    assert "5 runs (1 done, 2 failed, 1 running, 1 pending), all with merge=ties" in text
    assert rows[0]["vs_best_baseline"]["against"] == "b1"  # the best uniform merge's paired comparison
    assert ("| 0 | done | search.seed=0 | 0.810 | 0.750 | 0.600 | +0.150 [+0.100, +0.200], p=0.0123 | [" in text
            and "](0) | [log](0/cli.log) |" in text)
    assert "| 2 | failed: search.start='centre': use 'merge_defaults' or 'center' | search.seed=2 |" in text
    assert "| 3 | running on node7 (pid 42) | search.seed=3 |" in text
    assert "| 4 | pending | search.seed=4 |  |  |  |  |  |  |" in text


def test_a_running_job_whose_process_is_gone_reads_as_killed():
    ended = subprocess.Popen(["true"])
    ended.wait()  # its process id is free now
    here = {"num": 0, "status": "running", "error": None, "host": socket.gethostname()}
    assert settled({**here, "pid": os.getpid()})["status"] == "running"
    assert settled({**here, "host": "elsewhere", "pid": ended.pid})["status"] == "running"  # cannot be checked there
    gone = settled({**here, "pid": ended.pid})
    assert gone["status"] == "killed" and f"pid {ended.pid}) is gone" in gone["error"]


def test_every_job_of_a_basic_sweep_is_known_up_front():
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    overrides = {"task": ["command=search", "search.seed=0,1", "merge=ties,dare"]}
    config = OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": overrides}})
    assert sweep_jobs(config) == [["command=search", "search.seed=0", "merge=ties"],
                                  ["command=search", "search.seed=0", "merge=dare"],
                                  ["command=search", "search.seed=1", "merge=ties"],
                                  ["command=search", "search.seed=1", "merge=dare"]]
    config.hydra.overrides.task = ["command=search", "merge=glob(*)"]
    assert sweep_jobs(config) is None  # a glob needs Hydra's config loader: jobs are listed as they start


def _summary(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / SUMMARY_JSON).read_text())


@pytest.mark.slow  # four micro-zoo searches: a few minutes on 2 cores
def test_a_local_sweep_writes_a_run_per_job_and_a_summary_and_resumes(micro_zoo_home, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    main(["search", "-m", *MICRO, f"home={micro_zoo_home}", "search.generations=1", "search.seed=0,1",
          f"hydra.sweep.dir={sweep}"])
    rows = _summary(sweep)
    assert [r["num"] for r in rows] == [0, 1] and [r["status"] for r in rows] == ["done", "done"]
    for num, row in enumerate(rows):
        run_dir = sweep / str(num)
        assert Path(row["run_dir"]) == run_dir and f"search.seed={num}" in row["overrides"]
        report = json.loads((run_dir / "report.json").read_text())
        assert row["best_search"] == report["search"]["best_search_fitness"]
        assert row["test"] == next(r for r in report["rows"] if r["kind"] == "best")["metrics"]["fitness"]
        assert len((run_dir / "log.jsonl").read_text().splitlines()) == 4
    assert (sweep / "0" / "log.jsonl").read_text() != (sweep / "1" / "log.jsonl").read_text()  # other seed
    printed = capsys.readouterr().out
    assert "| 0 | done | search.seed=0 |" in printed and str(sweep / SUMMARY_MD) in printed

    # a multirun whose jobs resume the two runs, extending each to 2 generations
    again = tmp_path / "again"
    with pytest.raises(SystemExit) as exit_info:  # one of the two runs fails: the sweep exits 1 after its summary
        main(["search", "-m", *MICRO, f"home={micro_zoo_home}", "search.generations=2", f"hydra.sweep.dir={again}",
              f"resume={sweep / '0'},{sweep / '1'}", "search.seed=0"])
    assert exit_info.value.code == 1
    rows = _summary(again)
    assert [Path(r["run_dir"]) for r in rows] == [sweep / "0", sweep / "1"]
    assert len((sweep / "0" / "log.jsonl").read_text().splitlines()) == 8
    assert len((sweep / "1" / "log.jsonl").read_text().splitlines()) == 4  # seed 0 differs from the run's seed 1
    assert rows[0]["status"] == "done" and rows[1]["status"] == "failed"
    assert "setting search.seed was 1 in the checkpoint, is 0 now" in rows[1]["error"]


@pytest.mark.slow  # one micro-zoo search
def test_a_run_that_fails_is_in_the_summary_and_the_sweep_goes_on(micro_zoo_home, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "-m", *MICRO, f"home={micro_zoo_home}", "search.generations=1",
              "search.start=centre,center", f"hydra.sweep.dir={sweep}"])
    assert exit_info.value.code == 1
    rows = _summary(sweep)
    assert rows[0]["status"] == "failed" and "search.start='centre'" in rows[0]["error"]
    assert rows[1]["status"] == "done" and rows[1]["test"] is not None
    out = capsys.readouterr().out
    assert "1 of 2 runs failed or did not finish" in out
    assert "| 0 | failed: search.start='centre'" in (sweep / SUMMARY_MD).read_text()


def _launcher(*overrides: str) -> dict:
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["command=search", *overrides], return_hydra_config=True)
    assert cfg.hydra.callbacks.sweep_summary._target_ == "evomerge.search.sweep.SweepSummary"
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


def test_the_launcher_configs_compose():
    assert _launcher()["_target_"].endswith("BasicLauncher")
    assert _launcher("hydra/launcher=local")["_target_"].endswith("BasicLauncher")
    slurm = _launcher("hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu")
    assert slurm["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (slurm["gpus_per_node"], slurm["partition"], slurm["max_num_timeout"]) == (1, "gpu", 3)
    joblib = _launcher("hydra/launcher=joblib_local")
    assert joblib["_target_"].endswith("JoblibLauncher") and joblib["n_jobs"] == 2
