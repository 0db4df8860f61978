"""Bad input through the real CLI: one line naming the problem, exit status 1, nothing written or changed.

One table: each row is a command line (with {placeholders} filled from its setup), what its setup builds, and
the fragment the single error line must contain. Every row runs with hydra.run.dir inside the test's directory,
which is snapshotted before and compared after, so a half-written output or a changed run directory fails it.
"""

from __future__ import annotations

import hashlib
import logging
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evomerge.cli import main
from tests.helpers.checkpoints import (
    bigger_vocab,
    bigger_vocab_config,
    derived_checkpoint,
    llama_twin,
    narrower,
    pickle_checkpoint,
    remote_code_checkpoint,
    swapped_tokens,
)


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple[str, ...]  # command and overrides; {base}, {a}, {b}, {tmp}, {broken}, {run}, {zoo_home} are filled in
    message: str  # a fragment of the one error line
    setup: Callable[..., dict[str, str]] | None = None
    env: dict[str, str] = field(default_factory=dict)


def tiny_pool(*models: str, base: str = "{base}") -> tuple[str, ...]:
    listed = ",".join(f"'{m}'" for m in models)
    return ("search", "pool.zoo=false", f"pool.base='{base}'", f"pool.models=[{listed}]", "progress=false")


def broken(edit=None, edit_config=None, edit_tokenizer=None):
    def setup(tmp, ckpt, **_):
        path = derived_checkpoint(ckpt["expert_a"], tmp / "broken", edit, edit_config, edit_tokenizer)
        return {"broken": str(path)}
    return setup


def truncated(keep: Callable[[int], int]):
    """expert_a written anew by safetensors.torch.save_file, then cut to keep(<where its data starts>) bytes."""
    def setup(tmp, ckpt, **_):
        path = derived_checkpoint(ckpt["expert_a"], tmp / "broken", edit=lambda tensors: None)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:keep(8 + int.from_bytes(data[:8], "little"))])
        return {"broken": str(path)}
    return setup


def llama(tmp, ckpt, **_):
    return {"broken": str(llama_twin(ckpt["base"], tmp / "llama"))}


def pickled(tmp, ckpt, **_):
    return {"broken": str(pickle_checkpoint(ckpt["expert_a"], tmp / "pickled"))}


def remote_code(tmp, ckpt, **_):
    return {"broken": str(remote_code_checkpoint(ckpt["base"], tmp / "custom", tmp.parent / f"{tmp.name}-ran"))}


def recipe_file(text: str):
    def setup(tmp, ckpt, **_):
        (tmp / "recipe.yaml").write_text(text.format(a=ckpt["expert_a"], b=ckpt["expert_b"], base=ckpt["base"]))
        return {}
    return setup


def task_data(text: str):
    def setup(tmp, ckpt, **_):
        data = tmp / "zoo" / "data" / "toy_ja_qa" / "search.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text(text, encoding="utf-8")
        return {}
    return setup


def only_test_task(tmp, ckpt, **_):
    (tmp / "only_test.yaml").write_text(
        "name: only_test\nscorer: last_number\nprimary_metric: acc\nprompt: {template: 'Q: {question}'}\n"
        "generation: {max_new_tokens: 4}\nsplits: {test: {local: '${tasks_dir}/rows.jsonl'}}\n")
    (tmp / "rows.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    return {}


def overlapping_search_set(tmp, ckpt, **_):
    from evomerge.resources import DATA_DIR

    test_row = (DATA_DIR / "mgsm" / "mgsm_ja.tsv").read_text(encoding="utf-8").splitlines()[3]
    (tmp / "search.tsv").write_text(f"りんごが3個あります。2個もらいました。全部で何個ですか？\t5\n{test_row}\n",
                                    encoding="utf-8")
    return {}


def foreign_dir(tmp, ckpt, **_):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("not a run\n")
    return {}


def copied_run(edit: Callable[[Path], None] | None = None):
    def setup(tmp, ckpt, micro_run, **_):
        run = Path(shutil.copytree(micro_run, tmp / "run"))
        if edit is not None:
            edit(run)
        return {"run": str(run)}
    return setup


def old_version(run: Path) -> None:
    for name in ("checkpoint.json", "checkpoint.prev.json"):
        document = json.loads((run / name).read_text())
        document["version"] = 0
        (run / name).write_text(json.dumps(document))


MICRO = ("search", "zoo=micro", "home={zoo_home}", "progress=false", "search.popsize=2", "task.max_new_tokens=2")
OUT = "out={tmp}/out"

ROWS = [
    Row("population size that is not a number", (*tiny_pool("{a}"), "search.popsize=abc"),
        "search.popsize='abc': expected an integer"),
    Row("pipeline stage setting that is not a number", (*tiny_pool("{a}"), "search=ps_dfs", "search.ps.sigma0=x"),
        "search.ps.sigma0='x': expected a number"),
    Row("missing model path", tiny_pool("{a}", base="{tmp}/nowhere"),
        "pool.base '{tmp}/nowhere' is not a model directory"),
    Row("missing model path (eval)", ("eval", "model={tmp}/nowhere", "task=toy_ja_qa", OUT),
        "model '{tmp}/nowhere' is not a model directory"),
    Row("no model to evaluate", ("eval", "task=toy_ja_qa", OUT), "evomerge eval needs one of model="),
    Row("decode padding out of range", ("eval", "model={base}", "task=toy_ja_qa", "+max_decode_padding=1.5", OUT),
        "max_padding and max_decode_padding must be in [0, 1)"),
    Row("hub id while offline", (*tiny_pool("evomerge-tests/no-such-model"),),
        "model 'evomerge-tests/no-such-model' is not a local directory and the hub is offline",
        env={"HF_HUB_OFFLINE": "1"}),
    Row("hub id while offline (eval)", ("eval", "model=evomerge-tests/no-such-model", "task=toy_ja_qa", OUT),
        "model 'evomerge-tests/no-such-model' is not a local directory and the hub is offline",
        env={"HF_HUB_OFFLINE": "1"}),
    Row("different architectures", tiny_pool("{a}", "{broken}"), "has architecture 'llama'", llama),
    Row("different tensor shapes", tiny_pool("{a}", "{broken}"), "shape [48, 32]", broken(narrower)),
    Row("different vocab sizes", tiny_pool("{broken}"), "has vocab size 132 but", broken(bigger_vocab, bigger_vocab_config)),
    Row("different tokenizers", tiny_pool("{a}", "{broken}"), "has a different tokenizer",
        broken(edit_tokenizer=swapped_tokens)),
    Row("safetensors file cut inside its header", tiny_pool("{a}", "{broken}"),
        "{broken}/model.safetensors: not a valid safetensors file (truncated or corrupt: the file has 100 bytes, ending "
        "inside its", truncated(lambda data_start: 100)),
    Row("safetensors file cut inside its data", tiny_pool("{a}", "{broken}"),
        "{broken}/model.safetensors: not a valid safetensors file (truncated or corrupt: its tensors need",
        truncated(lambda data_start: data_start + 100)),
    Row("safetensors file cut inside its data (eval)", ("eval", "model={broken}", "task=toy_ja_qa", OUT),
        "{broken}/model.safetensors: not a valid safetensors file (truncated or corrupt: its tensors need",
        truncated(lambda data_start: data_start + 100)),
    Row("pickle weights without allow_pickle", tiny_pool("{a}", "{broken}"), "set allow_pickle=true", pickled),
    Row("remote code without trust_remote_code", ("eval", "model={broken}", "task=toy_ja_qa", OUT),
        "needs its own Python code to load (trust_remote_code)", remote_code),
    Row("no base where the method needs one", ("merge", "recipe={tmp}/recipe.yaml", OUT),
        "ties needs a base model", recipe_file("method: ties\nmodels: ['{a}', '{b}']\n")),
    Row("recipe that is not YAML", ("merge", "recipe={tmp}/recipe.yaml", OUT),
        "recipe.yaml is not valid YAML (line 2, column 1)", recipe_file("method: [unclosed\n")),
    Row("recipe with an unknown method option", ("merge", "recipe={tmp}/recipe.yaml", OUT),
        "ties parameter 'normalize': input should be a valid boolean, got 'yes'",
        recipe_file("method: ties\nbase: '{base}'\nmodels: ['{a}']\nparameters: {{normalize: 'yes'}}\n")),
    Row("density out of range (recipe)", ("merge", "recipe={tmp}/recipe.yaml", OUT),
        "density for model '{a}' must be in (0, 1], got 1.5",
        recipe_file("method: ties\nbase: '{base}'\nmodels: ['{a}']\ngroups: [{{name: blocks, density: 1.5}}]\n")),
    Row("density out of range (search)", (*tiny_pool("{a}", "{b}"), "merge=ties", "search.ranges.density=[0.0,1.0]"),
        "search range for density must lie in (0, 1]"),
    Row("weights out of range (search)", (*tiny_pool("{a}", "{b}"), "search.ranges.weight=[1.5,0.0]"),
        "search range for 'weight' is empty"),
    Row("layer granularity beyond the layer count", (*tiny_pool("{a}", "{b}"), "search.layer_groups=5"),
        "search.layer_groups=5 does not fit the models: cannot split 2 blocks into 5 ranges"),
    Row("recipe groups that miss layers", ("merge", "recipe={tmp}/recipe.yaml", OUT), "none of the recipe's groups",
        recipe_file("method: task_arithmetic\nbase: '{base}'\nmodels: ['{a}']\n"
                    "groups: [{{name: embed}}, {{name: blocks.0}}, {{name: head}}]\n")),
    Row("DFS with no repeat of the blocks", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2", "search.repeats=0"),
        "search.repeats=0: a layer path needs at least one repeat of the blocks"),
    Row("DFS embeddings from a model not in the pool", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2",
                                                         "search.embed_from=2"),
        "search.embed_from=2: the pool has 2 models"),
    Row("DFS objective that is no metric", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2", "search.objectives=[score,-cost]"),
        "unknown metric '-cost' in search.objectives"),
    Row("DFS scale range without 1", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2", "search.scale_range=[1.5,2.0]"),
        "search.scale_range [1.5, 2.0] must contain 1"),
    Row("DFS recipe whose block counts do not fit its models", ("eval", "recipe={tmp}/recipe.yaml", "task=toy_ja_qa", OUT),
        "the recipe gives {a} 3 blocks; the model has 2",
        recipe_file("kind: dfs\nmodels: ['{a}']\nlayers: [3]\nrepeats: 1\ninclude: [1, 1, 0]\n"
                    "scales: [[1, 1, 1], [1, 1, 1], [1, 1, 1]]\n")),
    Row("unknown task", (*tiny_pool("{a}", "{b}"), "task.name=no_such_task"), "unknown task 'no_such_task'"),
    Row("unknown task config", (*tiny_pool("{a}", "{b}"), "task=no_such_task"), "Could not find 'task/no_such_task'"),
    Row("CMA-ES over layer paths with two objectives", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2",
                                                         "search.optimizer=cmaes"),
        "search.optimizer=cmaes optimises one objective, search.objectives has 2"),
    Row("racing a layer-path search", (*tiny_pool("{a}", "{b}"), "search=dfs_nsga2", "fitness=racing"),
        "fitness=racing races the PS search's candidates (CMA-ES); search.kind=dfs needs fitness=full"),
    Row("racing on an objective that is no rate", (*tiny_pool("{a}", "{b}"), "fitness=racing",
                                                    "search.objectives=[tokens]"),
        "fitness=racing cannot race on objective 'tokens'"),
    Row("racing rounds that do not grow", (*tiny_pool("{a}", "{b}"), "fitness=racing", "fitness.growth=1.0"),
        "fitness.growth=1.0: Input should be greater than 1"),
    Row("racing rows drawn by an unknown rule", (*tiny_pool("{a}", "{b}"), "fitness=racing", "fitness.rows=smart"),
        "fitness.rows='smart': Input should be 'random' or 'informative'"),
    Row("unknown fitness schedule", (*tiny_pool("{a}", "{b}"), "fitness.schedule=sometimes"),
        "fitness.schedule='sometimes': use fitness=full or fitness=racing"),
    Row("tracker that does not exist", (*tiny_pool("{a}"), "tracker.kind=mlflow"),
        "tracker.kind='mlflow': use tracker=none, tracker=wandb or tracker=tensorboard"),
    Row("W&B mode that does not exist", (*tiny_pool("{a}"), "tracker=wandb", "tracker.mode=sometimes"),
        "tracker.mode='sometimes': Input should be 'online', 'offline' or 'disabled'"),
    Row("tracker setting that does not exist", (*tiny_pool("{a}"), "tracker=wandb", "+tracker.projekt=x"),
        "tracker.projekt='x': Extra inputs are not permitted"),
    Row("TensorBoard log directory that is empty", (*tiny_pool("{a}"), "tracker=tensorboard", "tracker.log_dir=''"),
        "tracker.log_dir='': String should have at least 1 character"),
    Row("lm-eval task that does not exist", (*tiny_pool("{a}"), "task=lm_eval", "task.tasks=[no_such_task]"),
        "lm-eval could not load task.tasks=['no_such_task']"),
    Row("lm-eval setting that does not exist", (*tiny_pool("{a}"), "task=lm_eval", "task.tasks=[x]", "+task.shots=3"),
        "task.shots=3: Extra inputs are not permitted"),
    Row("lm-eval objective that is no metric", (*tiny_pool("{a}"), "task=lm_eval", "task.tasks=[toy_arith]",
                                                f"task.include_path={Path(__file__).parent / 'lm_eval_tasks'}",
                                                "search.objectives=[toy_arith/acc]"),
        "unknown metric 'toy_arith/acc' in search.objectives: task 'lm_eval' yields"),
    Row("unknown metric", (*tiny_pool("{a}", "{b}"), "search.objectives=[accuracy]"),
        "unknown metric 'accuracy' in search.objectives"),
    Row("task file with malformed rows", ("eval", "model={base}", "task=toy_ja_qa", "split=search",
                                          "+zoo_dir={tmp}/zoo", "progress=false", OUT),
        "search.jsonl line 2: not valid JSON",
        task_data('{"question": "花子は何を持っていますか？", "answer": "ぼうし"}\n{"question": "x", \n')),
    Row("empty split", ("eval", "model={base}", "task=toy_ja_qa", "split=search", "+zoo_dir={tmp}/zoo", OUT),
        "has no rows (empty split)", task_data("\n")),
    Row("resume directory from an incompatible config", (*MICRO, "search.sigma0=0.3", "resume={run}"),
        "setting search.sigma0 was 0.1667 in the checkpoint, is 0.3 now", copied_run()),
    Row("checkpoint from an incompatible version", (*MICRO, "resume={run}"),
        "is not an evomerge checkpoint of version 1", copied_run(old_version)),
    Row("device this machine lacks", (*tiny_pool("{a}"), "device=cuda:99"), "device=cuda:99: "),
    Row("device this machine lacks (eval)", ("eval", "model={base}", "task=toy_ja_qa", "device=cuda:99", OUT),
        "device=cuda:99: "),
    Row("device this machine lacks (merge)", ("merge", "recipe={tmp}/recipe.yaml", "device=cuda:99", OUT),
        "device=cuda:99: ", recipe_file("method: linear\nmodels: ['{a}', '{b}']\n")),
    Row("device this machine lacks (export)", ("export", "recipe={tmp}/recipe.yaml", "device=cuda:99", OUT),
        "device=cuda:99: ", recipe_file("method: linear\nmodels: ['{a}', '{b}']\n")),
    Row("Ray executor with no workers", (*tiny_pool("{a}"), "executor=ray", "executor.workers=0"),
        "executor.workers=0: need at least one worker"),
    Row("unknown dtype", (*tiny_pool("{a}"), "dtype=float8"), "dtype=float8: use one of float32, bfloat16, float16"),
    Row("Ray workers holding GPUs that a CPU search leaves idle", (*tiny_pool("{a}"), "executor=ray",
                                                                    "executor.num_gpus=1"),
        "executor.num_gpus=1 with device=cpu: the workers would hold GPUs and merge on the CPU"),
    Row("executor that does not exist", (*tiny_pool("{a}"), "executor.kind=dask"),
        "executor.kind='dask': use 'serial' or 'ray'"),
    Row("task with no search split", (*tiny_pool("{a}", "{b}"), "task.name={tmp}/only_test.yaml"),
        "task 'only_test' has no split 'search', which a search needs", only_test_task),
    Row("search set that shares a question with the test set", (*tiny_pool("{a}", "{b}"), "task=mgsm_ja",
                                                                  "mgsm_search_file={tmp}/search.tsv"),
        "split 'search' ({tmp}/search.tsv) shares 1 question(s) with split 'test'", overlapping_search_set),
    Row("unknown Hydra override", ("search", "no_such_key=1"), "bad override: Could not override 'no_such_key'"),
    Row("output directory that exists and is not a run", ("search", "hydra.run.dir={tmp}/notes"),
        "output directory {tmp}/notes exists and is not a search run", foreign_dir),
]


@pytest.fixture(scope="module")
def micro_run(micro_zoo_home, tmp_path_factory) -> Path:
    """A real one-generation search on the micro zoo, for the resume rows (each works on a copy)."""
    run = tmp_path_factory.mktemp("micro_run") / "run"
    main([*(a.format(zoo_home=micro_zoo_home) for a in MICRO), "search.generations=1", f"hydra.run.dir={run}"])
    return run


def tree(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_clear_line_and_changes_nothing(row, request, tiny_checkpoints, tmp_path, capsys, monkeypatch):
    for key, value in row.env.items():
        monkeypatch.setenv(key, value)
    ckpt = tiny_checkpoints
    fill = {"base": ckpt["base"], "a": ckpt["expert_a"], "b": ckpt["expert_b"], "tmp": tmp_path}
    if row.setup is not None:
        extra = {"micro_run": request.getfixturevalue("micro_run")} if "{run}" in " ".join(row.argv) else {}
        fill.update(row.setup(tmp_path, ckpt, **extra))
    if any("zoo_home" in a for a in row.argv):
        fill["zoo_home"] = request.getfixturevalue("micro_zoo_home")
    argv = [a.format(**fill) for a in row.argv]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path}/hydra_run")
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"evomerge {argv[0]}: error: ") and row.message.format(**fill) in line, err
    assert tree(tmp_path) == before  # no output, no Hydra directory, no changed run directory
    assert not (tmp_path.parent / f"{tmp_path.name}-ran").exists()  # no model code ran


def test_pickle_weights_load_with_weights_only_when_allowed(tiny_checkpoints, tmp_path, capsys):
    """allow_pickle=true reads a .bin checkpoint (torch.load weights_only=True) and merges it like safetensors."""
    path = pickle_checkpoint(tiny_checkpoints["expert_a"], tmp_path / "pickled")
    (tmp_path / "recipe.yaml").write_text(
        f"method: task_arithmetic\nbase: '{tiny_checkpoints['base']}'\nmodels: ['{path}']\n")
    (tmp_path / "reference.yaml").write_text(
        f"method: task_arithmetic\nbase: '{tiny_checkpoints['base']}'\nmodels: ['{tiny_checkpoints['expert_a']}']\n")
    common = [f"hydra.run.dir={tmp_path}/hydra_run"]
    try:
        main(["merge", f"recipe={tmp_path}/recipe.yaml", f"out={tmp_path}/merged", "allow_pickle=true", *common])
    except SystemExit as exit_info:
        pytest.fail(f"exit {exit_info.code}: {capsys.readouterr().err}")
    main(["merge", f"recipe={tmp_path}/reference.yaml", f"out={tmp_path}/reference", *common])
    from safetensors.torch import load_file

    merged, reference = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert merged.keys() == reference.keys() and all((merged[k] == reference[k]).all() for k in merged)


def test_a_pickle_that_would_run_code_is_refused_even_when_allowed(tmp_path):
    """weights_only=True: a .bin whose unpickling would call a function fails instead of running it."""
    import pickle

    from evomerge.modelio import CheckpointReader, ModelLoadError, set_load_policy

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle, protocol=2)
    set_load_policy(allow_pickle=True)
    try:
        with pytest.raises(ModelLoadError, match="not a weights-only pickle state dict"):
            CheckpointReader(tmp_path / "evil")
    finally:
        set_load_policy()
    assert not marker.exists()


def test_a_refused_run_leaves_no_log_handler_on_its_removed_directory(tmp_path):
    """The refused run's directory goes, and so does Hydra's log handler on it: left attached, once its stream was
    closed the next log call in this process (mergekit's, in the tests after such a run) raised FileNotFoundError
    reopening cli.log."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["search", "pool.zoo=false", "pool.base=x", "pool.models=[]", "progress=false", f"hydra.run.dir={run}"])
    assert not run.exists()
    assert not [handler for handler in logging.root.handlers
                if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run.resolve()]
    logging.getLogger("evomerge.tests").warning("a warning after a refused run")
