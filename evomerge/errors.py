"""Every error evomerge raises on bad input, in one module at the bottom of the import graph.

Each is a ``ValueError`` (or ``RuntimeError``, for a search that cannot go on) whose message is one line naming
the input at fault; the CLI prints it as ``evomerge <command>: error: <message>`` without a traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


class MergeError(ValueError):
    """A recipe cannot be applied to its checkpoints; the message names the model and tensor at fault."""


class RecipeError(MergeError):
    """A recipe is malformed: unknown method, bad value, wrong number of per-model values, ..."""


class ExportError(MergeError):
    """An export source or destination is unusable (no run directory, no recipe, output exists, ...)."""


class PathModelError(MergeError):
    """A layer path cannot be built over these models."""


class PoolError(ValueError):
    """The pool config names a model that cannot be found."""


class SearchError(RuntimeError):
    """A search cannot start or go on; the message says why and what to do."""


class TaskError(ValueError):
    """A task definition, its variables or its data are wrong; the message names the file and the problem."""


class ModelLoadError(ValueError):
    """A model, tokenizer or checkpoint cannot be read: missing, not on an offline machine, pickle weights refused."""


class LanguageModelMissingError(FileNotFoundError):
    """lid.176.ftz (or the fastText runtime) is not installed, so the Japanese check cannot run."""


def settings_problem(error: ValidationError, prefix: str) -> str:
    """pydantic's first problem with a settings block as one line naming the key as typed on the command line:
    `<prefix><key>=<the value given>: <what is wrong>`."""
    problem = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in problem["loc"])
    given = "(missing)" if problem["type"] == "missing" else repr(problem["input"])
    return f"{prefix}{key}={given}: {problem['msg']}"
