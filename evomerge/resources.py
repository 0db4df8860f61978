"""The files that ship inside the package, found through `importlib.resources`: the Hydra config tree
(`evomerge/conf`), the task YAMLs (`evomerge/tasks`) and the bundled data (`evomerge/data`, e.g. MGSM).

An editable install reads them from the checkout, a wheel from site-packages; nothing here depends on the
current directory. evomerge must be installed as files on disk (not zipped): tasks and configs are read
as ordinary files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONF_MODULE = "evomerge.conf"  # Hydra reads the config tree as `pkg://evomerge.conf`


def package_path(*parts: str) -> Path:
    """A directory or file shipped inside the evomerge package."""
    location = resources.files("evomerge").joinpath(*parts)
    if not isinstance(location, Path):
        raise RuntimeError(f"evomerge/{'/'.join(parts)} is not a file on disk ({location!r}): install evomerge unzipped")
    return location


CONF_DIR = package_path("conf")  # the same tree as pkg://evomerge.conf, for reading single YAMLs (merge defaults, zoos)
TASKS_DIR = package_path("tasks")
DATA_DIR = package_path("data")
