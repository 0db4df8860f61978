"""Crash safety: SIGKILL a running search at random moments -- mid-merge, mid-evaluation, mid-checkpoint-write --
resume after each, and finish with exactly the log and best recipe of an uninterrupted run; a corrupt or truncated
checkpoint is reported and the previous one used. And bad candidates (inf weights, non-finite logits, out of
memory) are logged as failed while the search goes on, until most fail and the run stops saying why.

Each search "life" is a fork of the test process running the default PS search on the micro zoo -- the real
in-memory merger and evaluator -- traced by tests/helpers/crash_search.py (a fork starts in a millisecond where a
fresh interpreter takes seconds to import torch). The killer waits until the life's trace shows the chosen phase
(its k-th start in that life), sleeps a random fraction of the phase's typical length (measured on the
uninterrupted run), and SIGKILLs it; the trace's last line says which phase the kill landed in. The moments are
drawn from a seed printed at the start (set EVOMERGE_CRASH_SEED to draw the same plan again; the kernel's timing
still varies).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.recipe import PSRecipe
from evomerge.search.run import Budget, SearchError, load_checkpoint, run_search
from tests.helpers import crash_search

PHASES = ("merge", "eval", "checkpoint")
KILLS, SLOW_KILLS = 12, 20


def enough_generations(kills: int) -> int:
    """Generations no sequence of `kills` lives can finish: a life killed at its 2nd checkpoint has written up to 2
    generations, one killed at its 3rd merge or evaluation up to 3 candidates; the search must outlast them all."""
    aims = [PHASES[index % len(PHASES)] for index in range(kills)]
    most = sum(2 * crash_search.POPSIZE if aim == "checkpoint" else 3 for aim in aims)
    return most // crash_search.POPSIZE + 1


GENERATIONS, SLOW_GENERATIONS = enough_generations(KILLS), enough_generations(SLOW_KILLS)
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="lives are forked")


def start_life(run_dir: Path, trace: Path, home: Path, slow: bool = True, generations: int = GENERATIONS,
               racing: bool = False) -> int:
    trace.write_text("")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run the search, never return into pytest
        code = 0
        try:
            crash_search.search(run_dir, trace, generations, home, slow, racing)
        except BaseException:
            with open(run_dir.parent / "child_errors.txt", "a") as handle:
                traceback.print_exc(file=handle)
            code = 1
        os._exit(code)
    return pid


def finish_life(pid: int, run_dir: Path) -> None:
    _, status = os.waitpid(pid, 0)
    errors = run_dir.parent / "child_errors.txt"
    assert os.waitstatus_to_exitcode(status) == 0, errors.read_text() if errors.exists() else status


def entries(run_dir: Path) -> list[dict]:
    """The log without the `seconds` timings (the only field that differs between runs)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").exists() else []
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def without_seconds(entry: dict | None) -> dict | None:
    return None if entry is None else {k: v for k, v in entry.items() if k != "seconds"}


def uninterrupted(root: Path, home: Path, generations: int, racing: bool = False) -> Path:
    finish_life(start_life(root / "run", root / "trace", home, slow=False, generations=generations, racing=racing),
                root / "run")
    return root / "run"


def phase_lengths(reference: Path) -> dict[str, float]:
    """How long each phase typically lasts in a slowed life: the median evaluation of the uninterrupted run, the
    slowed checkpoint write (an fsync and two slowed renames, twice over) and half the slowed merge (the killer
    notices a phase a millisecond or so late, so a kill aimed at the whole 20 ms landed past it)."""
    seconds = [json.loads(line)["seconds"] for line in (reference / "log.jsonl").read_text().splitlines()]
    timed = [s for s in seconds if s]
    return {"merge": crash_search.MERGE_SECONDS / 2, "eval": statistics.median(s["eval"] for s in timed),
            "checkpoint": 4 * crash_search.CHECKPOINT_SECONDS["rename"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_zoo_home) -> Path:
    return uninterrupted(tmp_path_factory.mktemp("reference"), micro_zoo_home, GENERATIONS)


@pytest.fixture(scope="module")
def racing_reference(tmp_path_factory, micro_zoo_home) -> Path:
    return uninterrupted(tmp_path_factory.mktemp("racing_reference"), micro_zoo_home, GENERATIONS, racing=True)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory, micro_zoo_home) -> Path:
    return uninterrupted(tmp_path_factory.mktemp("slow_reference"), micro_zoo_home, SLOW_GENERATIONS)


def kill_and_resume(root: Path, reference: Path, home: Path, seed: int, kills: int, generations: int,
                    racing: bool = False) -> list[tuple]:
    """Kill a search `kills` times at random moments, checking the run directory after each kill, then let it
    finish; returns the plan (phase aimed at, occurrence, fraction, phase hit, checkpoint files left)."""
    rng = random.Random(seed)
    run_dir, trace = root / "run", root / "trace"
    expected, lengths = entries(reference), phase_lengths(reference)
    plan = []
    for index in range(kills):
        aim = PHASES[index % len(PHASES)]
        occurrence, fraction = rng.randint(1, 2 if aim == "checkpoint" else 3), rng.random()
        pid = start_life(run_dir, trace, home, generations=generations, racing=racing)
        while trace.read_text().splitlines().count(aim) < occurrence:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            assert finished == 0, f"seed {seed}: the search finished before kill {index + 1} ({plan})"
            time.sleep(0.0005)
        time.sleep(fraction * lengths[aim])
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        hit = trace.read_text().splitlines()[-1]
        on_disk = "+".join(name for name in ("checkpoint.json", "checkpoint.json.tmp", "checkpoint.prev.json")
                           if (run_dir / name).exists()) or "no checkpoint"
        plan.append((aim, occurrence, round(fraction, 3), hit, on_disk))
        state = load_checkpoint(run_dir)  # never half-written: it loads, or the run has not checkpointed yet
        kept = state["log_lines"] if state is not None else 0
        assert entries(run_dir)[:kept] == expected[:kept], f"seed {seed}: log differs after kill {plan[-1]}"
    finish_life(start_life(run_dir, trace, home, generations=generations, racing=racing), run_dir)
    assert entries(run_dir) == expected, f"seed {seed}: {plan}"
    assert (run_dir / "best_recipe.yaml").read_text() == (reference / "best_recipe.yaml").read_text()
    final, uninterrupted = load_checkpoint(run_dir), load_checkpoint(reference)
    assert without_seconds(final["best"]) == without_seconds(uninterrupted["best"])
    assert final["history"] == uninterrupted["history"] and final["evaluations"] == uninterrupted["evaluations"]
    return plan


def run_kills(tmp_path: Path, reference: Path, home: Path, seed: int | None, kills: int, generations: int,
              racing: bool = False) -> None:
    seed = int(os.environ.get("EVOMERGE_CRASH_SEED", seed if seed is not None else random.randrange(2**31)))
    print(f"crash-safety seed {seed} (EVOMERGE_CRASH_SEED={seed} draws this plan again)")
    plan = kill_and_resume(tmp_path, reference, home, seed, kills, generations, racing)
    print("kills (aimed phase, occurrence, fraction, phase hit, checkpoint files left):", *plan, sep="\n  ")
    hit = {entry[3] for entry in plan}
    assert len(plan) == kills and set(PHASES) <= hit, f"seed {seed}: kills landed in {hit}: {plan}"


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, reference, micro_zoo_home):
    run_kills(tmp_path, reference, micro_zoo_home, None, kills=KILLS, generations=GENERATIONS)


def test_sigkill_a_raced_search_then_resume_gives_the_uninterrupted_run(tmp_path, racing_reference, micro_zoo_home):
    """fitness=racing: a kill mid-race (each generation races in rounds of 2, 4 and 8 rows per task) re-races its
    generation into the same log lines. (The micro experts score 0 everywhere, so every race runs to the end.)"""
    log = entries(racing_reference)
    assert all(e["confirmed"] == (e["metrics"].get("n") == 16) for e in log if e["error"] is None)
    run_kills(tmp_path, racing_reference, micro_zoo_home, None, kills=KILLS, generations=GENERATIONS, racing=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_many_more_times(tmp_path, slow_reference, micro_zoo_home, seed):
    run_kills(tmp_path, slow_reference, micro_zoo_home, seed, kills=SLOW_KILLS, generations=SLOW_GENERATIONS)


def test_failing_candidates_are_logged_and_the_search_goes_on(reference):
    failed = [e for e in entries(reference) if e["error"]]
    assert 0 < len(failed) < len(entries(reference)) / 2
    assert all(e["fitness"] == [-1.0] and "safe region" in e["error"] for e in failed)
    assert len(entries(reference)) == GENERATIONS * crash_search.POPSIZE
    assert any(e["metrics"] and e["fitness"][0] > -1.0 for e in entries(reference))  # the real evaluator scored


def _copy_run(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for name in ("log.jsonl", "checkpoint.json", "checkpoint.prev.json", "best_recipe.yaml"):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing", "not an object"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_resumes(tmp_path, reference, micro_zoo_home, capsys,
                                                                       damage):
    run_dir = _copy_run(reference, tmp_path / "run")
    current = run_dir / "checkpoint.json"
    text = current.read_text()
    if damage == "truncated":
        current.write_text(text[: len(text) // 2])
    elif damage == "flipped byte":
        evaluations = GENERATIONS * crash_search.POPSIZE
        current.write_text(text.replace(f'"evaluations": {evaluations}', f'"evaluations": {evaluations + 1}'))
    elif damage == "missing":
        current.unlink()
    else:
        current.write_text("[1, 2]")
    state = load_checkpoint(run_dir)
    assert state["generation"] == GENERATIONS - 1  # the previous checkpoint
    out = capsys.readouterr().out
    if damage != "missing":
        assert "resuming from checkpoint.prev.json" in out and "checkpoint.json" in out.split(";")[0]
    finish_life(start_life(run_dir, tmp_path / "trace", micro_zoo_home, slow=False), run_dir)  # the last generation comes back from the log
    assert entries(run_dir) == entries(reference)
    assert (run_dir / "best_recipe.yaml").read_text() == (reference / "best_recipe.yaml").read_text()


def test_no_usable_checkpoint_is_an_error_naming_both(tmp_path, reference):
    run_dir = _copy_run(reference, tmp_path / "run")
    (run_dir / "checkpoint.json").write_text("{")
    (run_dir / "checkpoint.prev.json").write_text(
        (run_dir / "checkpoint.prev.json").read_text().replace(f'"generation": {GENERATIONS - 1}',
                                                               f'"generation": {GENERATIONS - 2}'))
    with pytest.raises(SearchError, match=r"checkpoint.json is unreadable .*checkpoint.prev.json fails its checksum"):
        load_checkpoint(run_dir)


# --------------------------------------------------------------------------- candidate faults
# A real in-memory merger and evaluator over the tiny checkpoints; each candidate's recipe carries its fault:
# weights that overflow the merge (inf weights, caught by the merger), weights that stay finite but overflow the
# forward pass (non-finite logits, caught by generation), or a candidate too large for memory (the allocator
# refuses it). A fixed list of generations stands in for the optimizer, so each generation's mix is known.

FAULTS = {
    "ok": (0.5, 0.7),
    "inf weights": (1e39, 1.0),  # finite as a recipe value, infinite once merged in float32
    "nan logits": (1e15, 0.0),  # merged weights ~1e13: finite, but the forward pass overflows
    "out of memory": (0.25, 0.25),
}


class FixedGenerations:
    """Asks the given generations in turn (genome = [fault index, jitter]); done after the last."""

    def __init__(self, generations):
        self.generations, self.told = generations, 0

    def ask(self):
        return [np.array([float(list(FAULTS).index(fault)), jitter]) for fault, jitter in self.generations[self.told]]

    def tell(self, genomes, fitness):
        self.told += 1

    def done(self):
        return self.told >= len(self.generations)


class FaultyProblem:
    objectives = ("score",)

    def __init__(self, merger, evaluator, base, models):
        self.merger, self.evaluator, self.base, self.models = merger, evaluator, base, models

    def decode(self, genome) -> PSRecipe:
        fault = list(FAULTS)[int(genome[0])]
        weights = tuple(w + float(genome[1]) for w in FAULTS[fault])
        groups = ["embed", "blocks.0", "blocks.1", "head"]
        return PSRecipe.uniform("task_arithmetic", self.base, self.models, groups=groups, weight=list(weights))

    def evaluate(self, recipe: PSRecipe):
        if recipe.groups[0]["weight"][0] == recipe.groups[0]["weight"][1]:  # the "out of memory" candidate
            torch.empty(2**60, dtype=torch.uint8)  # an exabyte: the allocator refuses, as for a model too large
        model = self.merger.merge(recipe)
        metrics = self.evaluator.evaluate(model, model_key=recipe.hash).metrics
        return metrics, {}


@pytest.fixture(scope="module")
def faulty_problem(tiny_checkpoints, tmp_path_factory):
    from evomerge.eval.evaluator import Evaluator, ResultCache
    from evomerge.eval.task import load_task
    from evomerge.merge.memory import InMemoryMerger
    from evomerge.modelio import load_tokenizer

    tasks = tmp_path_factory.mktemp("tasks")
    (tasks / "tiny_sums.jsonl").write_text("".join(
        json.dumps({"question": f"Tom has {a} apples and gets {b} more.", "answer": str(a + b)}) + "\n"
        for a, b in [(3, 5), (12, 9), (7, 7)]))
    (tasks / "tiny_sums.yaml").write_text(
        "name: tiny_sums\nscorer: last_number\nprimary_metric: acc\n"
        "prompt: {template: \"Question: {question}\\nAnswer:\"}\ngeneration: {max_new_tokens: 3}\n"
        "splits: {search: {local: \"${tasks_dir}/tiny_sums.jsonl\"}}\n")
    base, models = str(tiny_checkpoints["base"]), [str(tiny_checkpoints["expert_a"]), str(tiny_checkpoints["expert_b"])]
    evaluator = Evaluator(load_task("tiny_sums", {}, tasks), "search", load_tokenizer(base),
                          cache=ResultCache(keep_samples=False), progress=False)
    return FaultyProblem(InMemoryMerger(base, models), evaluator, base, models)


def test_faulty_candidates_are_logged_failed_and_the_search_goes_on(tmp_path, faulty_problem):
    generations = [[("ok", 0.0), ("inf weights", 0.0), ("ok", 0.1), ("nan logits", 0.0)],
                   [("out of memory", 0.0), ("ok", 0.2), ("ok", 0.3), ("nan logits", 0.1)],
                   [("ok", 0.05), ("ok", 0.15), ("ok", 0.25), ("ok", 0.35)]]
    result = run_search(tmp_path, faulty_problem, lambda: FixedGenerations(generations), {"test": "faults"},
                        Budget(len(generations)), progress=False)
    by_fault = {}
    for entry in result.entries:
        by_fault.setdefault(list(FAULTS)[int(entry["genome"][0])], []).append(entry)
    assert len(result.entries) == 12 and result.evaluations == 12  # every generation ran to the end
    assert all(e["error"] is None and 0 <= e["fitness"][0] <= 1 for e in by_fault["ok"])
    for fault, expected in [("inf weights", "MergeError: recipe "),
                            ("nan logits", "FloatingPointError: the model produced non-finite logits"),
                            ("out of memory", "out of memory: ")]:
        assert by_fault[fault] and all(expected in e["error"] and e["fitness"] == [-1.0] and not e["metrics"]
                                       for e in by_fault[fault]), by_fault[fault]
    assert all("merged tensor '" in e["error"] and "has NaN or infinite values" in e["error"]
               for e in by_fault["inf weights"])
    assert result.best["error"] is None and list(FAULTS)[int(result.best["genome"][0])] == "ok"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["error"] for e in logged] == [e["error"] for e in result.entries]


def test_a_run_where_most_candidates_fail_stops_and_says_why(tmp_path, faulty_problem):
    generations = [[("ok", 0.0), ("inf weights", 0.0), ("nan logits", 0.0), ("inf weights", 0.1)],
                   [("nan logits", 0.1), ("ok", 0.1), ("inf weights", 0.2), ("nan logits", 0.2)],
                   [("ok", 0.2)] * 4]
    with pytest.raises(SearchError, match=r"6 of 8 candidates failed; the last error was: FloatingPointError: the "
                                          r"model produced non-finite logits"):
        run_search(tmp_path, faulty_problem, lambda: FixedGenerations(generations), {"test": "faults"},
                   Budget(len(generations)), progress=False)
    assert load_checkpoint(tmp_path)["generation"] == 1  # the failing generation is logged, not checkpointed
