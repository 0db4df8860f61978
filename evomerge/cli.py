"""`evomerge <command> [hydra overrides]`: pick the command, let Hydra build the config, call the command."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from transformers.utils import logging as transformers_logging

from evomerge.errors import (
    LanguageModelMissingError,
    MergeError,
    ModelLoadError,
    PoolError,
    SearchError,
    TaskError,
)
from evomerge.modelio import set_load_policy
from evomerge.resources import CONF_MODULE
from evomerge.search.run import Interrupted
from evomerge.search.sweep import JobError

USER_ERRORS = (MergeError, TaskError, SearchError, PoolError, LanguageModelMissingError, ModelLoadError)
HYDRA_OWN = {".hydra", "cli.log"}  # what Hydra writes into a run's output directory before the command starts
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


def _foreign_run_dir(command: str, overrides: list[str]) -> str | None:
    """A search writes its run into hydra.run.dir: refuse an existing, non-empty directory that is not a run."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(("hydra.run.dir=", "++hydra.run.dir="))]
    if command != "search" or not given:
        return None
    path = Path(given[-1]).expanduser()
    if not path.exists():
        return None
    if not path.is_dir():
        return f"output directory {path} exists and is not a directory"
    if not {item.name for item in path.iterdir()} - HYDRA_OWN:
        return None  # empty, or left by Hydra alone
    if any((path / stage / name).exists() for stage in ("", "ps", "dfs")
           for name in ("checkpoint.json", "checkpoint.prev.json")):
        return None  # a run (or a PS+DFS pipeline's): the search resumes it in place
    return (f"output directory {path} exists and is not a search run (no checkpoint.json); "
            "choose a new hydra.run.dir, or resume=<run directory> to continue a run")


HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
HYDRA_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def hydra_arguments(command: str, arguments: list[str]) -> list[str]:
    """Hydra's flags (`-m`, `--cfg job`, ...) first, then `command=<command>`, then the overrides: Hydra's parser
    takes its flags before the overrides only, so `evomerge search -m a=1,2` must not become `command=search -m ...`."""
    flags, overrides, index = [], [], 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if not argument.startswith("-"):
            overrides.append(argument)
            continue
        flags.append(argument)
        if argument in ("--info", "-i"):  # its value is optional: name it, or `command=` would be taken for it
            given = index < len(arguments) and arguments[index] in HYDRA_INFO_CHOICES
            flags.append(arguments[index] if given else "all")
            index += given
        elif argument in HYDRA_VALUE_FLAGS and index < len(arguments):
            flags.append(arguments[index])
            index += 1
    return [*flags, f"command={command}", *overrides]


def _bad_override(command: str, overrides: list[str]) -> str | None:
    """Compose the config once up front so a bad override is one line, not Hydra's paragraph."""
    if any(override.startswith("-") for override in overrides):  # --multirun, --cfg, ...: Hydra's own flags
        return None
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            compose("config", overrides=[f"command={command}", *overrides])
    except HydraException as error:
        lines = []
        for line in str(error).splitlines():
            if line.strip().startswith(("Config search path", "See https://hydra.cc")):
                break
            if line.strip():
                lines.append(line.strip())
        return "bad override: " + " ".join(lines)
    return None


def _resumed_files(command: str, overrides: list[str]) -> dict[Path, bytes | None]:
    """The files of a resumed run that the command rewrites before it knows the run can be resumed."""
    resumed = [o.split("=", 1)[1] for o in overrides if o.startswith(("resume=", "++resume="))]
    if command != "search" or not resumed or not Path(resumed[-1]).expanduser().is_dir():
        return {}
    config = Path(resumed[-1]).expanduser() / "config.yaml"
    return {config: config.read_bytes() if config.is_file() else None}


def _restore(kept: dict[Path, bytes | None]) -> None:
    """Put a refused resume's run directory back as it was."""
    for path, data in kept.items():
        if data is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)


def _resolve(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _close_logs_in(directory: Path) -> None:
    """Detach the log file handlers Hydra opened in `directory` before it is removed: left on the root logger, the
    next log call in this process (a caller that runs `main` again, a library logging a warning) would raise
    FileNotFoundError reopening their file."""
    for handler in logging.root.handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == directory.resolve():
            logging.root.removeHandler(handler)
            handler.close()


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

    problem = _bad_override(command, overrides) or _foreign_run_dir(command, overrides)
    if problem:  # checked before Hydra prints a paragraph, or writes its .hydra/ and log into a directory
        print(f"evomerge {command}: error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    kept = _resumed_files(command, overrides)

    @hydra.main(config_path=f"pkg://{CONF_MODULE}", config_name="config", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        fresh = {item.name for item in output_dir.iterdir()} <= HYDRA_OWN
        try:
            set_load_policy(allow_pickle=cfg.get("allow_pickle", False), trust_remote_code=cfg.get("trust_remote_code", False))
            function(cfg)
        except USER_ERRORS as error:  # bad input: one line naming the problem, not a traceback
            written = {item.name for item in output_dir.iterdir()} - HYDRA_OWN - {"config.yaml"}
            sweep_job = HydraConfig.get().mode.name == "MULTIRUN"  # a sweep keeps its failed jobs' directories
            if fresh and not written and not sweep_job:  # nothing half-written: Hydra's new directory goes again
                _close_logs_in(output_dir)
                shutil.rmtree(output_dir, ignore_errors=True)
            _restore(kept)
            print(f"evomerge {command}: error: {error}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep's other runs go on; its summary names this one
                return JobError(str(error))  # (a scheduler's job process still exits 1: SweepSummary.on_job_end)
            raise SystemExit(1) from None
        except Interrupted as stop:  # a scheduler's timeout or preemption: the process ends, the run does not
            resume = cfg.get("resume") or output_dir
            print(f"evomerge {command}: stopped by {stop}; the run resumes from its last checkpoint: "
                  f"evomerge {command} resume={resume}", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum) from None  # the shell's code for "ended by this signal"
        finally:
            set_load_policy()  # back to the defaults: the policy is this command's, not the process's

    sys.argv = [f"evomerge {command}", *hydra_arguments(command, overrides)]
    run()


if __name__ == "__main__":
    main()
