"""Experiment trackers (`tracker=tensorboard`, `tracker=wandb`) on real micro-zoo searches, read back from the files
each library writes: TensorBoard's event files through the EventAccumulator its server reads them with, an offline
W&B run through its transaction log (tests/helpers/wandb_offline.py). Every generation is one step whose values are
what log.jsonl says (every micro-zoo candidate scores 0, so the fitness statistics are checked on lines that differ
too, below); a resumed run continues the same tracker run and logs no step twice; a sweep's jobs share one W&B
group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from evomerge.cli import main
from evomerge.search.run import generation_metrics
from tests.helpers.wandb_offline import offline_runs

MICRO = ["zoo=micro", "progress=false", "search.popsize=4", "task.max_new_tokens=2"]


def _search(home: Path, run_dir: Path, *overrides: str) -> None:
    main(["search", *MICRO, f"home={home}", f"hydra.run.dir={run_dir}", *overrides])


def expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per generation, what the tracker must show, worked out here from log.jsonl's lines."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = {}
    for generation in sorted({line["generation"] for line in lines}):
        this = [line for line in lines if line["generation"] == generation]
        fitness = [line["fitness"][0] for line in this if line["error"] is None]
        so_far = [line["fitness"][0] for line in lines if line["generation"] <= generation and line["error"] is None]
        steps[generation] = {
            "fitness/best_so_far": max(so_far), "fitness/generation_best": max(fitness),
            "fitness/generation_mean": sum(fitness) / len(fitness), "fitness/generation_std": float(np.std(fitness)),
            "rows_scored": sum(line["metrics"]["n"] for line in this if not line["cached"]),
            "seconds/merge": sum(line["seconds"].get("merge", 0.0) for line in this),
            "seconds/eval": sum(line["seconds"].get("eval", 0.0) for line in this),
            "evaluations": sum(line["generation"] <= generation for line in lines), "failed": len(this) - len(fitness)}
    return steps


def test_generation_metrics_read_the_log():
    """On log lines whose fitness differs (the micro zoo's searches all score 0): the best so far counts only
    candidates scored on every row; mean, spread and best leave failed candidates out; a cached repeat scores
    no rows and takes no time."""
    def line(generation, fitness, error=None, cached=False, confirmed=True, seconds=(0.5, 2.0)):
        return {"generation": generation, "fitness": [fitness], "error": error, "cached": cached,
                "confirmed": confirmed, "metrics": {} if error else {"n": 16},
                "seconds": {} if cached or error else {"merge": seconds[0], "eval": seconds[1]}}
    log = [line(0, 0.25), line(0, 0.75), line(0, 0.9, confirmed=False), line(0, -1.0, error="boom"),
           line(1, 0.5), line(1, 0.75, cached=True), line(1, 0.25, seconds=(1.0, 3.0))]
    assert generation_metrics(log, 0) == {
        "evaluations": 4, "failed": 1, "rows_scored": 48, "fitness/best_so_far": 0.75,
        "fitness/generation_best": 0.9, "fitness/generation_mean": pytest.approx((0.25 + 0.75 + 0.9) / 3),
        "fitness/generation_std": pytest.approx(float(np.std([0.25, 0.75, 0.9]))),
        "seconds/merge": 1.5, "seconds/eval": 6.0}
    assert generation_metrics(log, 1) == {
        "evaluations": 7, "failed": 0, "rows_scored": 32, "fitness/best_so_far": 0.75,
        "fitness/generation_best": 0.75, "fitness/generation_mean": 0.5,
        "fitness/generation_std": pytest.approx(float(np.std([0.5, 0.75, 0.25]))),
        "seconds/merge": 1.5, "seconds/eval": 5.0}


def tensorboard_events(log_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """Per tag, (step, value) as TensorBoard shows them: a restarted writer's purge applied, text decoded."""
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    value = lambda event: tensor_util.make_ndarray(event.tensor_proto).item()  # noqa: E731
    return {tag: [(event.step, value(event)) for event in events.Tensors(tag)] for tag in events.Tags()["tensors"]}


def test_tensorboard_shows_every_generation_once_across_a_resume(micro_zoo_home, tmp_path):
    """A search of 1 generation, resumed to 3; as though the first process had been killed after logging its
    generation but before recording that it had, so the resumed one logs it again over the purged old step."""
    run = tmp_path / "run"
    _search(micro_zoo_home, run, "search.generations=1", "tracker=tensorboard")
    kept = json.loads((run / "tracker.json").read_text())
    assert kept == {"tensorboard": {"log_dir": "tensorboard", "logged": 1}}
    (run / "tracker.json").write_text(json.dumps({"tensorboard": {**kept["tensorboard"], "logged": 0}}))
    _search(micro_zoo_home, tmp_path / "unused", "search.generations=3", "tracker=tensorboard", f"resume={run}")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resumed run's own file beside

    events = tensorboard_events(run / "tensorboard")
    want = expected(run)
    assert sorted(want) == [0, 1, 2]
    assert sorted(events) == sorted([*want[0], "recipe/text_summary", "test_report/text_summary"])
    for tag in want[0]:
        logged = events[tag]
        assert [step for step, _ in logged] == [0, 1, 2], tag  # every step once: none twice, none missing
        assert [value for _, value in logged] == pytest.approx([want[step][tag] for step in range(3)], rel=1e-6), tag
    assert json.loads((run / "tracker.json").read_text())["tensorboard"]["logged"] == 3

    (recipe,), (table,) = events["recipe/text_summary"], events["test_report/text_summary"]  # the first run's purged
    assert recipe[0] == table[0] == 3  # after the last generation
    assert [line.strip() for line in recipe[1].decode().splitlines()] == [
        line.strip() for line in (run / "best_recipe.yaml").read_text().splitlines()]
    report = json.loads((run / "report.json").read_text())
    lines = table[1].decode().splitlines()
    assert lines[0].split(" | ")[:3] == ["model", "kind", "fitness"] and len(lines) == 2 + len(report["rows"])
    assert [line.split(" | ")[:3] for line in lines[2:]] == [
        [row["name"], row["kind"], f"{row['metrics']['fitness']:.4g}"] for row in report["rows"]]


def test_wandb_offline_run_is_continued_on_resume(micro_zoo_home, tmp_path, monkeypatch):
    """tracker=wandb with WANDB_MODE=offline (the config's default mode follows it): a search of 1 generation,
    resumed to 2, is one W&B run (one id, one offline directory per process) with steps 0 and 1 once each."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = tmp_path / "run"
    _search(micro_zoo_home, run, "search.generations=1", "tracker=wandb", "tracker.project=evomerge-tests")
    _search(micro_zoo_home, tmp_path / "unused", "search.generations=2", "tracker=wandb", f"resume={run}")

    first, resumed = offline_runs(run)
    run_id = json.loads((run / "tracker.json").read_text())["wandb"]["id"]
    assert first.run_id == resumed.run_id == run_id
    assert first.project == resumed.project == "evomerge-tests"  # the run's own project, though not given again
    assert first.name == str(run) and first.group == ""  # a single run: no group
    assert first.config["search"]["popsize"] == 4 and first.config["tracker"]["mode"] == "offline"

    history = [row for each in (first, resumed) for row in each.history]
    assert [row["_step"] for row in history] == [0, 1]
    want = expected(run)
    for row in history:
        assert {key: row[key] for key in want[row["_step"]]} == pytest.approx(want[row["_step"]], rel=1e-6)

    for each in (first, resumed):  # each process logs the recipe it reports, and the report as a table
        assert each.artifacts[0] == (f"recipe-{run_id}", "recipe", ["best_recipe.yaml"])
        assert each.summary["test_report"]["_type"] == "table-file"
    table = json.loads((resumed.directory / "files" / resumed.summary["test_report"]["path"]).read_text())
    report = json.loads((run / "report.json").read_text())
    assert table["columns"][:3] == ["model", "kind", "fitness"]
    assert [row[:3] for row in table["data"]] == [[row["name"], row["kind"], row["metrics"]["fitness"]]
                                                  for row in report["rows"]]


def test_a_sweeps_jobs_share_one_wandb_group(micro_zoo_home, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    sweep = tmp_path / "sweep"
    main(["search", "-m", *MICRO, f"home={micro_zoo_home}", "search.generations=1", "search.seed=0,1",
          "tracker=wandb", f"hydra.sweep.dir={sweep}"])
    runs = [each for job in ("0", "1") for each in offline_runs(sweep / job)]
    assert [each.group for each in runs] == [str(sweep)] * 2
    assert [each.name for each in runs] == [str(sweep / "0"), str(sweep / "1")]
    assert runs[0].run_id != runs[1].run_id


@pytest.mark.parametrize("kind, modules", [("wandb", ["wandb"]),
                                           ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])])
def test_a_tracker_whose_library_is_missing_is_one_line(kind, modules, micro_zoo_home, tmp_path, monkeypatch, capsys):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` of it raises ImportError, as if not installed
    with pytest.raises(SystemExit) as exit_info:
        _search(micro_zoo_home, tmp_path / "run", f"tracker={kind}")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"evomerge search: error: tracker={kind} needs the {kind} package: pip install 'evomerge[trackers]'")
    assert not (tmp_path / "run" / "tracker.json").exists()


def test_a_wandb_run_that_cannot_start_is_one_line(micro_zoo_home, tmp_path, monkeypatch, capsys):
    """Online without an API key (W&B's own error, quoted); nothing recorded for a run that never started."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no settings file with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # nor from a netrc file
    with pytest.raises(SystemExit) as exit_info:
        _search(micro_zoo_home, tmp_path / "run", "search.generations=1", "tracker=wandb", "tracker.mode=online")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "evomerge search: error: tracker=wandb: cannot start the W&B run: No API key configured")
    assert not (tmp_path / "run" / "tracker.json").exists()
