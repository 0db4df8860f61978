"""The task and the evaluator a command's `task` config entry names: one of evomerge's own task files
(`evomerge/tasks/`, or a YAML of one's own), or lm-eval tasks (`task=lm_eval`, `evomerge.eval.harness`).
Search, eval and the held-out report ask here, so they never tell the kinds apart themselves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from evomerge.eval.evaluator import Evaluator, ResultCache, generation_options
from evomerge.eval.harness import HARNESS_TASK, HarnessEvaluator, HarnessSettings, HarnessTask
from evomerge.eval.task import AnyTask, load_task

ScoredTask = AnyTask | HarnessTask


def configured_task(entry: Mapping[str, Any] | str, variables: Mapping[str, Any] | None = None) -> ScoredTask:
    """The task of a `task` entry (a mapping with `name`, or a bare name): `name: lm_eval` selects lm-eval tasks."""
    name = entry if isinstance(entry, str) else entry.get("name")
    if name == HARNESS_TASK:
        return HarnessTask(HarnessSettings.load(entry if isinstance(entry, Mapping) else {"name": name}))
    return load_task(name, variables)


def task_evaluator(task: ScoredTask, split: str, tokenizer: PreTrainedTokenizerBase, options: Mapping[str, Any],
                   cache: ResultCache | None = None, progress: bool = True) -> Evaluator | HarnessEvaluator:
    """The evaluator of `task` on `split`, with generation options (`generation_options`) set on the command."""
    if isinstance(task, HarnessTask):  # an lm-eval task's own generation kwargs set how many tokens it generates
        options = {key: value for key, value in options.items() if key != "max_new_tokens"}
        return HarnessEvaluator(task, split, tokenizer, **options, cache=cache, progress=progress)
    return Evaluator(task, split, tokenizer, **options, cache=cache, progress=progress)


def pool_evaluator(task: ScoredTask, task_settings: Mapping[str, Any], tokenizer_source: str,
                   split: str) -> Evaluator | HarnessEvaluator:
    """The evaluator a search builds with its `task` config group's settings: the search split keeps metrics only
    (a long search scores thousands of candidates), other splits keep every sample for the report."""
    from evomerge.modelio import load_tokenizer

    return task_evaluator(task, split, load_tokenizer(tokenizer_source), generation_options(task_settings),
                          cache=ResultCache(keep_samples=False) if split == "search" else None, progress=False)
