"""The pool: the base and source models a search merges, named once and resolved to local paths or hub ids.

`evomerge/conf/pool/*.yaml` gives either explicit paths / hub ids, or `zoo: true` with model names inside the toy zoo
(built on first use from the `zoo` config). Validation of architectures, shapes and vocabularies happens where
the tensors are read (the merge engine); here the pool checks that every local path exists and fetches hub ids
into the local hub cache (the merger reads local safetensors), or finds them there when offline.

The pool also carries the task variables a search's tasks read their data with: the zoo's directory, and the
top-level data settings of the config (`mgsm_dir`, `mgsm_search_file`: `evomerge.eval.task.CONFIG_VARIABLES`).
`early_variables` gives those known before anything is built or fetched, and `check_placement` the device and
dtype, so a search can check its task, data and device before the pool is touched.

`Pool.identity` names the models by what they are, not where they lie (`member_identity`), for the settings a
resumed search must match: a hub model as its id and the commit of the snapshot used, so a run resumes under
another HF_HOME or after the cache moved, and refuses a model whose revision changed; a toy-zoo model by the
zoo's spec hash, so a run resumes under another `home`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ModelLoadError, PoolError
from evomerge.eval.task import CONFIG_VARIABLES
from evomerge.modelio import DTYPES, hub_snapshot, local_checkpoint

Identity = str | dict[str, str]  # what `member_identity` records: a path, or the fields that name a model


@dataclass(frozen=True)
class Pool:
    base: str
    models: tuple[str, ...]
    names: tuple[str, ...]  # short display names, one per model
    variables: dict[str, str]  # task variables the pool provides (the zoo's data directory)

    @property
    def tokenizer_source(self) -> str:
        return self.base

    @property
    def identity(self) -> dict[str, Any]:
        """The base and the models by identity, not location (`member_identity`): what a resumed run must match.
        Derived from the paths, so a pool built from another (the PS+DFS pipeline's DFS pool) has one too."""
        return {"base": member_identity(self.base), "models": [member_identity(model) for model in self.models]}


ZOO_DIR = re.compile(r"zoo-.+-[0-9a-f]{10}")  # evomerge.zoo.build.zoo_dir: zoo-<variant>-<spec hash>


def member_identity(path: str | Path) -> Identity:
    """What the model at ``path`` (a resolved pool member) is, wherever it lies:

    - a hub cache snapshot (`modelio.hub_snapshot`): ``{"hub": id, "revision": commit sha}``, the commit of the
      snapshot actually read, so the same model under another HF_HOME is the same, and a new revision is not;
    - a model inside a built toy zoo: ``{"zoo": "zoo-<variant>-<spec hash>", "model": path inside it}``: the
      directory's name hashes the zoo's whole spec, so the zoo built (or moved) under another `home` is the same;
    - any other directory: its resolved path.
    """
    snapshot = hub_snapshot(path)
    if snapshot is not None:
        return {"hub": snapshot[0], "revision": snapshot[1]}
    local = Path(path).expanduser().resolve()
    for zoo in local.parents:
        if ZOO_DIR.fullmatch(zoo.name) and (zoo / "zoo_report.json").is_file():
            return {"zoo": zoo.name, "model": local.relative_to(zoo).as_posix()}
    return str(local)


def _check_local(path: str, what: str) -> str:
    """A local model directory for ``path``; a hub id is fetched into (or, offline, found in) the hub cache."""
    try:
        return local_checkpoint(path, what)
    except ModelLoadError as error:
        raise PoolError(str(error)) from None


def config_variables(cfg: DictConfig) -> dict[str, str]:
    """The task variables set as top-level settings (`mgsm_dir=...`); unset (null) ones are left out, so each
    task keeps its own default."""
    return {name: str(cfg.get(name)) for name in CONFIG_VARIABLES if cfg.get(name) is not None}


def early_variables(cfg: DictConfig) -> dict[str, str]:
    """The task variables known before the pool is resolved: the config's, and the zoo's directory when the
    zoo is already built (a zoo still to be built writes its task data as it builds)."""
    variables = config_variables(cfg)
    if OmegaConf.select(cfg, "pool.zoo") and cfg.get("zoo") is not None:
        from evomerge.zoo.build import ZooSpec, zoo_dir

        root = zoo_dir(ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True)), cfg.home)
        if (root / "zoo_report.json").is_file():
            variables["zoo_dir"] = str(root)
    return variables


def check_placement(device: str, dtype: str) -> None:
    """Refuse a device this machine does not have, or an unknown dtype, in one line (before any model is read)."""
    import torch

    if str(dtype) not in DTYPES:
        raise PoolError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
    try:
        parsed = torch.device(str(device))
    except (RuntimeError, TypeError) as error:
        raise PoolError(f"device={device}: not a torch device ({str(error).splitlines()[0]}); use cpu, cuda or "
                        "cuda:<index>") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this PyTorch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise PoolError(f"device={device}: {why}; use device=cpu, or run where a GPU is")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PoolError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PoolError(f"device={device}: MPS is not available here; use device=cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise PoolError(f"device={device}: use cpu, cuda, cuda:<index> or mps")


def resolve_pool(cfg: DictConfig) -> Pool:
    """Build the zoo if the pool lives in it, then return absolute model locations."""
    pool: dict[str, Any] = OmegaConf.to_container(cfg.pool, resolve=True)
    models = pool.get("models") or []
    if not models:
        raise PoolError("the pool has no models; set pool.models=[...]")
    variables = config_variables(cfg)
    if pool.get("zoo"):
        from evomerge.zoo.build import ZooSpec, build_zoo

        root = build_zoo(ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True)), cfg.home)
        for name in [pool["base"], *models]:
            if not (root / name).is_dir():
                raise PoolError(f"the toy zoo at {root} has no model {name!r}")
        return Pool(str(root / pool["base"]), tuple(str(root / m) for m in models), tuple(models),
                    {**variables, "zoo_dir": str(root)})
    base = _check_local(str(pool["base"]), "pool.base")
    paths = tuple(_check_local(str(m), "pool model") for m in models)
    names = tuple(pool.get("names") or [Path(m).name for m in models])
    return Pool(base, paths, names, variables)
