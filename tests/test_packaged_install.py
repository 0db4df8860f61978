"""A packaged install: configs, tasks and MGSM data ship inside the package (evomerge/resources.py finds them);
a user's own task files and config folder are added on top; and (slow) the built wheel, installed in a fresh
venv, runs search, eval and export from a directory outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.eval.task import TaskError, load_task
from evomerge.resources import CONF_DIR, DATA_DIR, TASKS_DIR

ROOT = Path(__file__).resolve().parents[1]
MY_TASK = """\
name: my_sums
description: a task of the user's own, its data next to it
scorer: last_number
primary_metric: acc
prompt: {template: "Q: {question}\\nA:"}
generation: {max_new_tokens: 3, stop: ["\\n"]}
splits: {test: {local: "${tasks_dir}/my_sums.jsonl"}}
"""


def test_the_package_holds_its_configs_tasks_and_data():
    assert (CONF_DIR / "config.yaml").is_file() and (CONF_DIR / "hydra" / "launcher" / "slurm_gpu.yaml").is_file()
    assert (TASKS_DIR / "mgsm_ja.yaml").is_file() and (TASKS_DIR / "toy_two_skill.yaml").is_file()
    for name in ("mgsm_ja.tsv", "mgsm_en.tsv", "mgsm_ja_exemplars.json", "LICENSE", "README.md"):
        assert (DATA_DIR / "mgsm" / name).is_file(), name
    assert CONF_DIR.parent == TASKS_DIR.parent == DATA_DIR.parent == Path(sys.modules["evomerge"].__file__).parent


def _mgsm_rows(directory: Path, rows: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mgsm_ja.tsv").write_text(rows, encoding="utf-8")
    return directory


def test_mgsm_is_read_from_mgsm_dir_then_the_package_then_the_hub(tmp_path, monkeypatch):
    given = _mgsm_rows(tmp_path / "given", "質問\t7\n")
    data = load_task("mgsm_ja", {"mgsm_dir": str(given)}).load_split("test")
    assert data.source == str(given.resolve() / "mgsm_ja.tsv") and len(data.examples) == 1

    data = load_task("mgsm_ja").load_split("test")  # no mgsm_dir: the copy shipped with evomerge
    assert data.source == str((DATA_DIR / "mgsm" / "mgsm_ja.tsv").resolve()) and len(data.examples) == 250
    assert data.examples[0].answer == "18"
    fewshot = load_task("mgsm_ja_fewshot")
    assert fewshot.build_prompt("Q").count("### 指示:") == 9

    import datasets

    asked = []

    def hub(path, name, split):
        asked.append((path, name, split))
        return [{"question": "問題", "answer_number": 3}]

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr("evomerge.eval.task.DATA_DIR", tmp_path / "no_package_data")
    data = load_task("mgsm_ja").load_split("test")
    assert data.source == "hub:juletxara/mgsm/ja" and asked == [("juletxara/mgsm", "ja", "test")]


def test_a_task_file_of_ones_own(tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_sums.yaml").write_text(MY_TASK)
    (tasks / "my_sums.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    # `extends:` and composite components look next to the file first, then in the packaged tasks
    (tasks / "my_mgsm.yaml").write_text("name: my_mgsm\nextends: mgsm_ja\ngeneration: {max_new_tokens: 8}\n")
    (tasks / "my_mix.yaml").write_text("name: my_mix\ncomponents: [{task: my_sums, metric: acc}, "
                                       "{task: toy_ja_qa, metric: acc_ja}]\n")

    by_path = load_task(str(tasks / "my_sums.yaml"))
    assert by_path.name == "my_sums" and by_path.load_split("test").source == str(tasks.resolve() / "my_sums.jsonl")
    assert load_task("my_sums", tasks_dir=tasks).config_path == by_path.config_path
    assert load_task("toy_ja_qa", tasks_dir=tasks).config_path == TASKS_DIR.resolve() / "toy_ja_qa.yaml"
    extended = load_task(str(tasks / "my_mgsm.yaml"))
    assert extended.max_new_tokens == 8 and len(extended.load_split("test").examples) == 250
    mix = load_task(str(tasks / "my_mix.yaml"))
    assert [c.task.config_path.parent for c in mix.components] == [tasks.resolve(), TASKS_DIR.resolve()]
    with pytest.raises(TaskError, match=r"task file .*nope\.yaml does not exist"):
        load_task(str(tasks / "nope.yaml"))
    with pytest.raises(TaskError, match=r"unknown task 'nope'.*known tasks in .*my_tasks: \['my_mgsm'"):
        load_task("nope", tasks_dir=tasks)


def test_the_cli_takes_a_task_file_and_a_config_dir_of_ones_own(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets it for Hydra
    tasks, conf = tmp_path / "my_tasks", tmp_path / "my_conf"
    tasks.mkdir()
    (tasks / "my_sums.yaml").write_text(MY_TASK)
    (tasks / "my_sums.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+3", "answer": "5"}\n')
    (conf / "task").mkdir(parents=True)  # a config group entry of the user's own, naming the task file
    (conf / "task" / "my_sums.yaml").write_text(f"name: {tasks / 'my_sums.yaml'}\nbatch_size: 8\n")
    common = [f"model={tiny_checkpoints['base']}", "progress=false"]

    main(["eval", f"task.name={tasks / 'my_sums.yaml'}", f"out={tmp_path / 'by_path.json'}", *common])
    main(["eval", "--config-dir", str(conf), "task=my_sums", f"out={tmp_path / 'by_conf.json'}", *common])
    for name in ("by_path", "by_conf"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["task"] == "my_sums" and report["metrics"]["n"] == 2, name
        assert report["data_sources"] == {"my_sums": str(tasks.resolve() / "my_sums.jsonl")}
    capsys.readouterr()
    main(["eval", "--config-dir", str(conf), "task=toy_ja_qa", "--cfg", "job"])  # the packaged entries stay
    assert "name: toy_ja_qa" in capsys.readouterr().out


# --- slow: the wheel, installed without the checkout -----------------------------------------------------------

WHEEL_FILES = [
    "evomerge/conf/__init__.py",
    "evomerge/conf/config.yaml",
    "evomerge/conf/hydra/launcher/slurm_gpu.yaml",
    "evomerge/conf/merge/ties.yaml",
    "evomerge/conf/zoo/micro.yaml",
    "evomerge/tasks/mgsm_ja.yaml",
    "evomerge/tasks/toy_two_skill.yaml",
    "evomerge/data/mgsm/mgsm_ja.tsv",
    "evomerge/data/mgsm/mgsm_en.tsv",
    "evomerge/data/mgsm/mgsm_ja_exemplars.json",
    "evomerge/data/mgsm/LICENSE",
    "evomerge/data/mgsm/README.md",
]


def _build_wheel(tmp: Path) -> Path:
    """The wheel of this checkout, built from a clean copy (a stale build/ in the checkout cannot leak into it)."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "evomerge", source / "evomerge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp / "dist").glob("evomerge-*.whl")
    return wheel


def _venv(tmp: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed and nothing downloaded: this interpreter's site-packages (torch,
    hydra, ...) are reachable through a .pth line, which adds the folder but runs none of its .pth files -- so
    the checkout's editable install of evomerge stays out. The .pth is written after the install, so pip never
    sees (and never uninstalls) that editable install."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    where = subprocess.run([str(python), "-c", "import evomerge; print(evomerge.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
    return venv


@pytest.mark.slow
def test_the_wheel_searches_evaluates_and_exports_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    missing = sorted(set(WHEEL_FILES) - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, f"the wheel lacks {missing} (pyproject.toml [tool.setuptools.package-data])"
    venv = _venv(tmp_path, wheel)
    work, home = tmp_path / "elsewhere", tmp_path / "home"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "EVOMERGE_HOME")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def evomerge(*arguments: str) -> str:
        done = subprocess.run([str(venv / "bin" / "evomerge"), *arguments, "progress=false"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"evomerge {' '.join(arguments)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    evomerge("search", "zoo=micro", "search.generations=1", "search.popsize=2", f"home={home}")
    (run,) = (work / "outputs" / "search").iterdir()  # Hydra's run directory, under the current directory
    for name in ("checkpoint.json", "best_recipe.yaml", "report.json", "config.yaml"):
        assert (run / name).is_file(), name
    (zoo,) = (path for path in home.glob("zoo-micro-*") if path.is_dir())  # beside it: its build lock file

    evomerge("eval", f"model={zoo / 'ja_expert'}", "task=toy_two_skill", "zoo=micro", f"home={home}",
             f"out={work / 'eval.json'}")
    report = json.loads((work / "eval.json").read_text())
    assert report["task"] == "toy_two_skill" and report["metrics"]["split"] == "test" and report["metrics"]["n"] > 0
    evomerge("eval", f"model={zoo / 'base'}", "task=mgsm_ja", "task.max_new_tokens=2", f"out={work / 'mgsm.json'}")
    report = json.loads((work / "mgsm.json").read_text())
    assert report["metrics"]["n"] == 250 and Path(report["data_sources"]["mgsm_ja"]).is_relative_to(venv)

    evomerge("export", f"run={run}", f"out={work / 'export'}")
    for name in ("recipe.yaml", "mergekit.yaml", "model/config.json", "model/model.safetensors", "model/README.md"):
        assert (work / "export" / name).is_file(), name
