"""`evomerge <command> [hydra overrides]`: pick the command, let Hydra build the config, call the command."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from transformers.utils import logging as transformers_logging

from evomerge.eval.language import LanguageModelMissingError
from evomerge.eval.task import TaskError
from evomerge.merge import MergeError
from evomerge.pool import PoolError
from evomerge.search.run import SearchError

USER_ERRORS = (MergeError, TaskError, SearchError, PoolError, LanguageModelMissingError)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
COMMANDS = {
    "zoo": ("evomerge.zoo.command:zoo_command", "build (or find cached) the toy model zoo and print its report"),
    "eval": ("evomerge.eval.command:eval_command", "score a model directory or recipe on a task split"),
    "search": ("evomerge.search.command:search_command", "search merge recipes (CMA-ES), then report on the test split"),
    "merge": ("evomerge.merge.command:merge_command", "merge models from a recipe file into a model directory"),
    "export": ("evomerge.export:export_command", "write a run's or recipe's recipe, mergekit config and merged model"),
    "study": ("evomerge.study.command:study_command", "merging at scale: N experts x methods x base kinds, normalized"),
}


def usage() -> str:
    lines = ["usage: evomerge <command> [key=value ...]  (Hydra overrides; --help for the config)", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"evomerge: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    transformers_logging.disable_progress_bar()  # per-file loading bars drown the search's own progress
    function = _resolve(COMMANDS[command][0])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            function(cfg)
        except USER_ERRORS as error:  # bad input: one line naming the problem, not a traceback
            print(f"evomerge {command}: error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    sys.argv = [f"evomerge {command}", f"command={command}", *overrides]
    run()


if __name__ == "__main__":
    main()
