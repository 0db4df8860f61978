"""The pool: the base and source models a search merges, named once and resolved to local paths or hub ids.

`evomerge/conf/pool/*.yaml` gives either explicit paths / hub ids, or `zoo: true` with model names inside the toy zoo
(built on first use from the `zoo` config). Validation of architectures, shapes and vocabularies happens where
the tensors are read (the merge engine); here the pool checks that every local path exists and fetches hub ids
into the local hub cache (the merger reads local safetensors), or finds them there when offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.modelio import ModelLoadError, local_checkpoint


class PoolError(ValueError):
    """The pool config names a model that cannot be found."""


@dataclass(frozen=True)
class Pool:
    base: str
    models: tuple[str, ...]
    names: tuple[str, ...]  # short display names, one per model
    variables: dict[str, str]  # task variables the pool provides (the zoo's data directory)

    @property
    def tokenizer_source(self) -> str:
        return self.base


def _check_local(path: str, what: str) -> str:
    """A local model directory for ``path``; a hub id is fetched into (or, offline, found in) the hub cache."""
    try:
        return local_checkpoint(path, what)
    except ModelLoadError as error:
        raise PoolError(str(error)) from None


def resolve_pool(cfg: DictConfig) -> Pool:
    """Build the zoo if the pool lives in it, then return absolute model locations."""
    pool: dict[str, Any] = OmegaConf.to_container(cfg.pool, resolve=True)
    models = pool.get("models") or []
    if not models:
        raise PoolError("the pool has no models; set pool.models=[...]")
    if pool.get("zoo"):
        from evomerge.zoo.build import ZooSpec, build_zoo

        root = build_zoo(ZooSpec.from_dict(OmegaConf.to_container(cfg.zoo, resolve=True)), cfg.home)
        for name in [pool["base"], *models]:
            if not (root / name).is_dir():
                raise PoolError(f"the toy zoo at {root} has no model {name!r}")
        return Pool(str(root / pool["base"]), tuple(str(root / m) for m in models), tuple(models),
                    {"zoo_dir": str(root)})
    base = _check_local(str(pool["base"]), "pool.base")
    paths = tuple(_check_local(str(m), "pool model") for m in models)
    names = tuple(pool.get("names") or [Path(m).name for m in models])
    return Pool(base, paths, names, {})
