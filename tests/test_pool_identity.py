"""A search's pool recorded by identity, not location: resuming under another HF_HOME or `home` works, a new revision
is refused naming both.

Hub models are laid out as a real hub cache (`models--org--name/blobs`, `snapshots/<commit>/` of relative links,
`refs/main`) under a temporary HF_HOME, read offline (HF_HUB_OFFLINE=1): no network, no shared cache touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from evomerge.cli import main
from evomerge.pool import Pool, PoolError, member_identity, resolve_pool
from evomerge.resources import CONF_DIR, CONF_MODULE
from evomerge.search.command import search_settings
from evomerge.search.run import SearchError, check_settings, load_checkpoint
from evomerge.zoo.build import ZooSpec, zoo_dir
from tests.test_mgsm_search import MGSM_TEST_ROWS, SEARCH_ROWS, error_line, write_jsonl

OLD, NEW = "a" * 40, "b" * 40  # two commits of one repo
REPOS = {"org/base": "base", "org/ja": "expert_a", "org/math": "expert_b"}  # hub id -> tiny checkpoint
HUB_POOL = ("pool=evollm_jp", "pool.base=org/base", "pool.models=[org/ja,org/math]", "pool.names=[ja,math]")


def add_snapshot(hf_home: Path, repo_id: str, commit: str, source: Path, ref: str | None = "main") -> Path:
    """`source`'s files as the hub cache under `hf_home` holds a download of `repo_id` at `commit` (and `ref`)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def hub_cache(hf_home: Path, checkpoints: dict[str, Path], commits: dict[str, str] | None = None) -> Path:
    for repo_id, name in REPOS.items():
        add_snapshot(hf_home, repo_id, (commits or {}).get(repo_id, OLD), checkpoints[name])
    return hf_home


@pytest.fixture
def use_hf_home(monkeypatch):
    """Point the hub cache at an HF_HOME, offline, as a fresh process with that environment would see it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(hf_home: Path) -> None:
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import

    return use


def config(*overrides: str):
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose("config", overrides=["command=search", *overrides])


def settings_under(hf_home: Path, use_hf_home, *overrides: str) -> tuple[Pool, dict]:
    use_hf_home(hf_home)
    cfg = config(*HUB_POOL, *overrides)
    pool = resolve_pool(cfg)
    return pool, json.loads(json.dumps(search_settings(cfg, pool)))  # as a checkpoint stores them


def test_hub_models_are_recorded_by_id_and_commit_so_another_hf_home_resumes(tiny_checkpoints, use_hf_home,
                                                                             tmp_path):
    pool, saved = settings_under(hub_cache(tmp_path / "hf_a", tiny_checkpoints), use_hf_home)
    assert Path(pool.base) == tmp_path / "hf_a" / "hub" / "models--org--base" / "snapshots" / OLD
    assert saved["pool"] == {"base": {"hub": "org/base", "revision": OLD},
                             "models": [{"hub": "org/ja", "revision": OLD}, {"hub": "org/math", "revision": OLD}]}

    shutil.copytree(tmp_path / "hf_a", tmp_path / "hf_b", symlinks=True)  # the cache moved: the old one is gone
    shutil.rmtree(tmp_path / "hf_a")
    moved, current = settings_under(tmp_path / "hf_b", use_hf_home)
    assert Path(moved.base).is_relative_to(tmp_path / "hf_b") and (Path(moved.base) / "config.json").is_file()
    assert current == saved
    check_settings(saved, current)  # what a resume checks: no refusal


def test_a_new_revision_is_refused_in_one_line_naming_both_revisions(tiny_checkpoints, use_hf_home, tmp_path):
    _, saved = settings_under(hub_cache(tmp_path / "hf_a", tiny_checkpoints), use_hf_home)
    for repo_id, where in [("org/base", "pool.base"), ("org/math", "pool.models")]:
        hf_home = hub_cache(tmp_path / f"hf_{where}", tiny_checkpoints, {repo_id: NEW})
        pool, current = settings_under(hf_home, use_hf_home)
        assert member_identity(pool.base if where == "pool.base" else pool.models[1]) == {"hub": repo_id,
                                                                                          "revision": NEW}
        with pytest.raises(SearchError) as refusal:
            check_settings(saved, current)
        message = str(refusal.value)
        assert message.startswith("cannot resume: ") and where in message and "\n" not in message, message
        assert OLD in message and NEW in message, message


def test_a_pool_member_may_pin_a_revision_by_branch_tag_or_commit(tiny_checkpoints, use_hf_home, tmp_path):
    hf_home = tmp_path / "hf"
    add_snapshot(hf_home, "org/base", OLD, tiny_checkpoints["base"], ref="v1")
    add_snapshot(hf_home, "org/base", NEW, tiny_checkpoints["base"], ref="main")
    hub_cache(hf_home, tiny_checkpoints, {"org/base": "c" * 40})  # a third commit of org/base, main's now
    for base, commit in [("org/base", "c" * 40), ("org/base@main", "c" * 40), ("org/base@v1", OLD),
                         (f"org/base@{NEW}", NEW)]:
        pool, settings = settings_under(hf_home, use_hf_home, f"pool.base={base}")
        assert Path(pool.base).name == commit and settings["pool"]["base"] == {"hub": "org/base", "revision": commit}
    for base, message in [("org/base@", "pool.base 'org/base@' names no revision after '@'"),
                          ("org/base@v2", "pool.base 'org/base@v2' is not a local directory and the hub is offline")]:
        with pytest.raises(PoolError, match=message):
            settings_under(hf_home, use_hf_home, f"pool.base={base}")


def test_zoo_models_are_recorded_by_the_zoo_s_spec_hash_so_another_home_resumes(tmp_path):
    spec = ZooSpec.from_dict(yaml.safe_load((CONF_DIR / "zoo" / "micro.yaml").read_text()))
    recorded = []
    for home in (tmp_path / "home", tmp_path / "moved_home"):  # the micro zoo as built (its models are not read)
        root = zoo_dir(spec, home)
        for name in ("base", "ja_expert", "math_expert"):
            (root / name).mkdir(parents=True)
        (root / "zoo_report.json").write_text("{}")
        cfg = config("zoo=micro", f"home={home}")
        pool = resolve_pool(cfg)
        assert Path(pool.base) == root / "base"
        recorded.append(json.loads(json.dumps(search_settings(cfg, pool))))
    assert recorded[0]["pool"] == {"base": {"zoo": root.name, "model": "base"},
                                   "models": [{"zoo": root.name, "model": "ja_expert"},
                                              {"zoo": root.name, "model": "math_expert"}]}
    assert recorded[0] == recorded[1]
    assert member_identity(root / "base" / "sub") == {"zoo": root.name, "model": "base/sub"}  # a study zoo's depth
    (root / "zoo_report.json").unlink()  # not a built zoo: a plain directory
    assert member_identity(root / "base") == str(root / "base")


def test_a_local_directory_is_recorded_by_its_resolved_path(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_checkpoints["base"].parent)
    cfg = config("pool=evollm_jp", "pool.base=./base", "pool.models=[./expert_a,expert_b/../expert_b]",
                 "pool.names=[a,b]")
    resolved = {name: str(path.resolve()) for name, path in tiny_checkpoints.items()}
    assert resolve_pool(cfg).identity == {"base": resolved["base"],
                                          "models": [resolved["expert_a"], resolved["expert_b"]]}
    snapshot = tmp_path / "elsewhere" / "models--org--name" / "snapshots" / OLD  # a snapshot copied out of a cache
    shutil.copytree(tiny_checkpoints["base"], snapshot)
    assert member_identity(snapshot) == {"hub": "org/name", "revision": OLD}
    not_a_snapshot = tmp_path / "elsewhere" / "models--org--name"
    assert member_identity(not_a_snapshot) == str(not_a_snapshot)


def test_a_search_resumes_under_another_hf_home_and_refuses_a_new_revision(tiny_checkpoints, use_hf_home, tmp_path,
                                                                           capsys):
    """Through `evomerge search`: one generation under one HF_HOME, the cache moved, the second under another."""
    mgsm_dir = tmp_path / "mgsm"
    mgsm_dir.mkdir()
    (mgsm_dir / "mgsm_ja.tsv").write_text("\n".join(MGSM_TEST_ROWS[:2]) + "\n", encoding="utf-8")
    search = write_jsonl(tmp_path / "search.jsonl", SEARCH_ROWS[:2])
    argv = ["search", *HUB_POOL, "task=mgsm_ja", f"mgsm_dir={mgsm_dir}", f"mgsm_search_file={search}",
            "task.max_new_tokens=2", "task.batch_size=8", "search.popsize=2", "progress=false"]
    run = tmp_path / "run"
    use_hf_home(hub_cache(tmp_path / "hf_a", tiny_checkpoints))
    main([*argv, "search.generations=1", f"hydra.run.dir={run}"])
    assert load_checkpoint(run)["settings"]["pool"]["base"] == {"hub": "org/base", "revision": OLD}

    os.rename(tmp_path / "hf_a", tmp_path / "hf_b")
    use_hf_home(tmp_path / "hf_b")
    main([*argv, "search.generations=2", f"resume={run}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert load_checkpoint(run)["generation"] == 2 and len((run / "log.jsonl").read_text().splitlines()) == 4

    use_hf_home(hub_cache(tmp_path / "hf_new", tiny_checkpoints, {"org/ja": NEW}))
    line = error_line([*argv, "search.generations=3", f"resume={run}"], tmp_path / "refused", capsys)
    assert "cannot resume: " in line and "pool.models" in line and OLD in line and NEW in line, line
    assert load_checkpoint(run)["generation"] == 2
