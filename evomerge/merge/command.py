"""`evomerge merge recipe=<file> out=<dir>`: the merge command behind the Hydra CLI.

Without ``recipe`` the recipe is built from the ``merge`` config group (``conf/merge/<method>.yaml``) plus
``base`` and ``models``, with the same values in every layer group.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import MergeError
from evomerge.merge.stream import merge_to_disk
from evomerge.pool import check_placement
from evomerge.recipe import PSRecipe


def merge_command(cfg: DictConfig) -> None:
    """Merge ``cfg.recipe`` (a recipe YAML) or ``cfg.merge`` + ``cfg.base`` + ``cfg.models`` into ``cfg.out``."""
    out = OmegaConf.select(cfg, "out")
    if not out:
        raise MergeError("merge needs out=<directory>")
    device = OmegaConf.select(cfg, "device", default=None) or "cpu"
    check_placement(device, OmegaConf.select(cfg, "dtype", default=None) or "float32")
    recipe_path = OmegaConf.select(cfg, "recipe")
    if recipe_path:
        recipe = PSRecipe.load(recipe_path)
    else:
        merge = OmegaConf.select(cfg, "merge")
        models = OmegaConf.select(cfg, "models")
        if merge is None or not models:
            raise MergeError("merge needs recipe=<file>, or a merge=<method> config with base=<dir> and models=[...]")
        recipe = PSRecipe.from_merge_config(
            OmegaConf.to_container(merge, resolve=True), OmegaConf.select(cfg, "base"), list(models),
            OmegaConf.select(cfg, "groups"),
        )
    written = merge_to_disk(recipe, out, overwrite=bool(OmegaConf.select(cfg, "overwrite", default=False)),
                            device=device)
    print(f"merged recipe {recipe.hash} ({recipe.method}, {len(recipe.models)} models) into {written}")
