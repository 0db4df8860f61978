"""MGSM-JA as a search task, and the order of a search's checks, through the real CLI.

`evomerge search pool=evollm_jp task=mgsm_ja` offline: the cheap checks (settings, device, executor, the task's
splits and objectives, its data) come before the pool, so a bad setting fails with the pool never touched
(`resolve_pool` is replaced by a tripwire), and with everything else right the one error line names the missing
model. A search on a local search file records every generation setting in config.yaml and report.json; mgsm_dir
and mgsm_search_file reach the task in eval and search.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

import evomerge.search.command as command
from evomerge.cli import main
from evomerge.resources import CONF_MODULE, DATA_DIR

GPU_EXAMPLE = ("search", "pool=evollm_jp", "task=mgsm_ja", "dtype=bfloat16", "progress=false")
SEARCH_ROWS = [("りんごが3個あります。2個もらいました。全部で何個ですか？", "5"),
               ("えんぴつが10本あります。4本あげました。残りは何本ですか？", "6"),
               ("ねこが2ひきいます。3ひききました。ねこは何ひきですか？", "5"),
               ("本が8冊あります。半分を読みました。読んだのは何冊ですか？", "4")]
MGSM_TEST_ROWS = (DATA_DIR / "mgsm" / "mgsm_ja.tsv").read_text(encoding="utf-8").splitlines()


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in rows),
                    encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, an empty hub cache (no model of the pool is cached), and no hub datasets either."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))

    def load_dataset(path, name=None, split=None):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.fixture
def pool_tripwire(monkeypatch):
    """`resolve_pool` (the first thing that fetches, builds or loads a model) fails the test if it is reached."""
    touched = []

    def tripwire(cfg):
        touched.append(cfg.pool)
        raise AssertionError("the pool was touched before the cheap checks failed")

    monkeypatch.setattr(command, "resolve_pool", tripwire)
    return touched


def error_line(argv, tmp_path, capsys) -> str:
    """Run the CLI, expect exit status 1 and one error line, no traceback and no run directory left behind."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" not in err and "AssertionError" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"evomerge {argv[0]}: error: "), err
    assert not (tmp_path / "run").exists()
    return lines[-1]


# --- the offline GPU example, step by step -----------------------------------------------------------------------


def test_without_cuda_device_cuda_is_one_line_before_the_pool(offline, pool_tripwire, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    line = error_line([*GPU_EXAMPLE, "device=cuda"], tmp_path, capsys)
    assert "device=cuda: " in line and "use device=cpu, or run where a GPU is" in line
    assert not pool_tripwire


def test_offline_without_a_search_set_names_the_missing_data(offline, pool_tripwire, tmp_path, capsys):
    line = error_line(GPU_EXAMPLE, tmp_path, capsys)
    assert "no data for task 'mgsm_ja' split 'search'" in line
    assert "set mgsm_search_file=<a .jsonl or .tsv file" in line
    assert "hub dataset 'SakanaAI/gsm8k-ja-test_250-1319' is not in the datasets cache and the hub is offline" in line
    assert not pool_tripwire


def test_offline_with_a_search_file_names_the_missing_model(offline, tmp_path, capsys):
    search = write_jsonl(tmp_path / "search.jsonl", SEARCH_ROWS)
    line = error_line([*GPU_EXAMPLE, f"mgsm_search_file={search}"], tmp_path, capsys)
    assert ("pool.base 'mistralai/Mistral-7B-v0.1' is not a local directory and the hub is offline (HF_HUB_OFFLINE=1) "
            "with no cached copy of it: give a local path, or download it") in line


def test_a_search_file_that_shares_a_test_question_is_refused_before_the_pool(offline, pool_tripwire, tmp_path, capsys):
    search = tmp_path / "search.tsv"
    search.write_text("\n".join([*(f"{q}\t{a}" for q, a in SEARCH_ROWS), MGSM_TEST_ROWS[5]]) + "\n", encoding="utf-8")
    line = error_line([*GPU_EXAMPLE, f"mgsm_search_file={search}"], tmp_path, capsys)
    assert f"split 'search' ({search}) shares 1 question(s) with split 'test'" in line
    assert "the first at row 5" in line and "must not overlap" in line
    assert not pool_tripwire


# --- bad settings fail with the pool never touched ----------------------------------------------------------------

ONLY_TEST = ("name: only_test\nscorer: last_number\nprimary_metric: acc\nprompt: {template: 'Q: {question}'}\n"
             "generation: {max_new_tokens: 4}\nsplits: {test: {local: '${tasks_dir}/rows.jsonl'}}\n")


def only_test_task(tmp_path: Path) -> Path:
    (tmp_path / "only_test.yaml").write_text(ONLY_TEST)
    write_jsonl(tmp_path / "rows.jsonl", SEARCH_ROWS)
    return tmp_path / "only_test.yaml"


@pytest.mark.parametrize(("overrides", "message"), [
    (("search.objectives=[accuracy]",), "unknown metric 'accuracy' in search.objectives: task 'mgsm_ja' yields"),
    (("search=dfs_nsga2", "search.objectives=[score,-cost]"), "unknown metric '-cost' in search.objectives"),
    (("search=ps_dfs", "search.dfs.objectives=[score,-cost]"), "unknown metric '-cost' in search.objectives"),
    (("task.name={only_test}",), "task 'only_test' has no split 'search', which a search needs"),
    (("task.max_new_tokens=0",), "max_new_tokens, batch_size and max_batch_tokens must be positive"),
    (("executor.kind=dask",), "executor.kind='dask': use 'serial' or 'ray'"),
    (("search.start=middle",), "search.start='middle': use 'merge_defaults' or 'center'"),
    (("merge=slerp",), "slerp merges exactly 2 models, recipe lists 3"),
    (("search=ps_dfs", "search.dfs.repeats=0"), "search.repeats=0: a layer path needs at least one repeat"),
    (("search=dfs_nsga2", "search.embed_from=3"), "search.embed_from=3: the pool has 3 models"),
    (("dtype=float8",), "dtype=float8: use one of float32, bfloat16, float16"),
    (("device=tpu",), "device=tpu: "),
])
def test_a_bad_setting_fails_before_the_pool_is_touched(overrides, message, offline, pool_tripwire, tmp_path, capsys):
    argv = [*GPU_EXAMPLE, *(o.format(only_test=only_test_task(tmp_path)) for o in overrides)]
    assert message in error_line(argv, tmp_path, capsys)
    assert not pool_tripwire


def test_bad_ray_executor_settings_fail_before_the_pool_is_touched(offline, pool_tripwire, tmp_path, capsys):
    pytest.importorskip("ray")
    line = error_line([*GPU_EXAMPLE, "executor=ray", "executor.workers=0"], tmp_path, capsys)
    assert "executor.workers=0: need at least one worker" in line and not pool_tripwire


# --- a search on MGSM-JA data of one's own: mgsm_dir and mgsm_search_file reach it, and it records its settings ---


def test_a_search_on_a_local_search_file_records_every_generation_setting(tiny_checkpoints, offline, tmp_path, capsys):
    mgsm_dir = tmp_path / "mgsm"
    mgsm_dir.mkdir()
    (mgsm_dir / "mgsm_ja.tsv").write_text("\n".join(MGSM_TEST_ROWS[:3]) + "\n", encoding="utf-8")
    search = write_jsonl(tmp_path / "search.jsonl", SEARCH_ROWS)
    run = tmp_path / "run"
    pool = (f"pool.base={tiny_checkpoints['base']}",
            f"pool.models=[{tiny_checkpoints['expert_a']},{tiny_checkpoints['expert_b']}]", "pool.names=[a,b]")
    def argv(search_file: Path) -> list[str]:
        return ["search", "pool=evollm_jp", *pool, "task=mgsm_ja", f"mgsm_dir={mgsm_dir}", f"mgsm_search_file={search_file}",
                "task.max_new_tokens=2", "task.batch_size=8", "search.generations=1", "search.popsize=2", "progress=false"]

    main([*argv(search), f"hydra.run.dir={run}"])

    expected = {"decoding": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": 2,
                "stop_strings": ["### 指示"], "batch_size": 8, "max_padding": 0.1, "max_batch_tokens": None,
                "max_decode_padding": 0.2}
    sources = {"search": {"mgsm_ja": str(search)}, "test": {"mgsm_ja": str(mgsm_dir / "mgsm_ja.tsv")}}
    variables = {"mgsm_dir": str(mgsm_dir), "mgsm_search_file": str(search)}
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert config["task"]["max_new_tokens"] == 2 and config["mgsm_search_file"] == str(search)
    assert config["resolved"] == {"generation": {"mgsm_ja": expected}, "task_variables": variables,
                                  "data_sources": sources}
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert report["generation"] == {"mgsm_ja": expected} and report["data_sources"] == sources
    assert report["task_variables"] == variables
    assert {row["metrics"]["n"] for row in report["rows"]} == {3}  # the test rows of mgsm_dir, not the shipped 250
    checkpoint = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))
    assert checkpoint["settings"]["task_variables"] == variables

    other = write_jsonl(tmp_path / "other.jsonl", SEARCH_ROWS[:2])  # a resumed run must search the same data
    before = (run / "config.yaml").read_bytes()
    line = error_line([*argv(other), f"resume={run}"], tmp_path / "resumed", capsys)
    assert (run / "config.yaml").read_bytes() == before
    assert "cannot resume: setting task_variables.mgsm_search_file was" in line


def test_the_task_s_own_max_new_tokens_is_recorded_when_none_is_set():
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["command=search", "task=mgsm_ja", "task.batch_size=16"])
        two_skill = compose("config", overrides=["command=search", "task.max_new_tokens=7"])
    record = command.check_task(cfg, {}, {"search": {"mgsm_ja": "skipped"}})  # no hub access needed
    assert record["generation"]["mgsm_ja"]["max_new_tokens"] == 512 and record["generation"]["mgsm_ja"]["batch_size"] == 16
    assert record["data_sources"]["test"]["mgsm_ja"] == str((DATA_DIR / "mgsm" / "mgsm_ja.tsv").resolve())
    record = command.check_task(two_skill, {})  # a composite: each component's settings; no zoo_dir, no data read
    assert {name: g["max_new_tokens"] for name, g in record["generation"].items()} == {"toy_ja_qa": 7, "toy_en_math": 7}
    assert record["data_sources"] == {"search": {}, "test": {}}


def test_eval_reads_mgsm_dir(tiny_checkpoints, tmp_path):
    mgsm_dir = tmp_path / "mgsm"
    mgsm_dir.mkdir()
    (mgsm_dir / "mgsm_ja.tsv").write_text("\n".join(MGSM_TEST_ROWS[:2]) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    main(["eval", f"model={tiny_checkpoints['base']}", "task=mgsm_ja", f"mgsm_dir={mgsm_dir}", "task.max_new_tokens=1",
          "progress=false", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["metrics"]["n"] == 2 and report["data_sources"] == {"mgsm_ja": str(mgsm_dir / "mgsm_ja.tsv")}


def test_eval_reads_mgsm_search_file(tiny_checkpoints, offline, tmp_path):
    search = write_jsonl(tmp_path / "search.jsonl", SEARCH_ROWS)
    out = tmp_path / "eval.json"
    main(["eval", f"model={tiny_checkpoints['base']}", "task=mgsm_ja", "split=search", f"mgsm_search_file={search}",
          "task.max_new_tokens=1", "progress=false", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["metrics"]["n"] == len(SEARCH_ROWS) and report["data_sources"] == {"mgsm_ja": str(search)}
