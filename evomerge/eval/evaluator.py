"""Evaluator: (task, split, generation settings) -> metrics and per-sample records for any model.

Built once per search: the split is read and its prompts tokenized and grouped once, then every candidate
model reuses them (a prefix all prompts share, such as MGSM-JA's instruction header, is split off then too;
each candidate reads it once, see `generate.py`). Results are cached under (model key, task, split,
settings), where the model key is whatever identifies the weights: a recipe hash during search, a directory
for `evomerge eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from evomerge.eval.generate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_DECODE_PADDING,
    DEFAULT_MAX_PADDING,
    EncodedPrompts,
    GenerationSettings,
    encode_prompts,
    generate_encoded,
)
from evomerge.eval.task import AnyTask, CompositeTask, SampleScore, SplitData, Task, plain_tasks


@dataclass(frozen=True)
class RowScores:
    """Some rows of one plain task, scored: each row's score and its answer's generated tokens."""

    scores: tuple[SampleScore, ...]
    tokens: tuple[int, ...]

@dataclass
class EvalResult:
    task: str
    split: str
    model_key: str | None
    metrics: dict[str, Any]  # always score, acc, acc_ja, ja_rate, n, split (+ <task>/<metric> for composites)
    samples: list[dict[str, Any]]
    generation: dict[str, Any]  # per plain task: the settings that defined the generations
    data_sources: dict[str, str]  # per plain task: the file or hub dataset its rows came from
    cached: bool = False

    @property
    def score(self) -> float:
        return self.metrics["score"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultCache:
    """In-process results by key, optionally mirrored to a JSON file so separate runs share them.

    `keep_samples=False` stores metrics only, which a long search wants (thousands of candidates)."""

    def __init__(self, path: str | Path | None = None, keep_samples: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.keep_samples = keep_samples
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"result cache {self.path} is not valid JSON ({error.msg}); delete it or pass another path") from None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> EvalResult | None:
        entry = self._entries.get(key)
        return EvalResult(**{**entry, "cached": True}) if entry is not None else None

    def put(self, key: str, result: EvalResult) -> None:
        entry = result.to_dict()
        if not self.keep_samples:
            entry["samples"] = []
        entry["cached"] = False
        self._entries[key] = entry
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self._entries, ensure_ascii=False), encoding="utf-8")
            os.replace(temporary, self.path)  # atomic: a crash never leaves half a cache


@dataclass
class _PreparedTask:
    """One plain task's split, ready to generate: rows, prompts and their token batches."""

    task: Task
    data: SplitData
    prompts: list[str]
    encoded: EncodedPrompts
    settings: GenerationSettings
    fingerprint: str  # changes whenever prompts, golds, scoring or generation settings change


class Evaluator:
    """Scores models on one task and split. Composite tasks run each component on the same split."""

    def __init__(
        self,
        task: AnyTask,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_padding: float = DEFAULT_MAX_PADDING,
        max_batch_tokens: int | None = None,
        max_decode_padding: float = DEFAULT_MAX_DECODE_PADDING,
        max_new_tokens: int | None = None,
        cache: ResultCache | None = None,
        progress: bool = True,
    ) -> None:
        """Batching options are those of `GenerationSettings`; max_new_tokens overrides the task's own."""
        self.task = task
        self.split = split
        self.tokenizer = tokenizer
        self.cache = cache if cache is not None else ResultCache()
        self.progress = progress
        self._subsets: dict[str, tuple[tuple[int, ...], _PreparedTask]] = {}  # the last slice asked of each task
        self.prepared = [
            self._prepare(
                plain,
                GenerationSettings(
                    max_new_tokens=max_new_tokens if max_new_tokens is not None else plain.max_new_tokens,
                    stop_strings=plain.stop_strings,
                    batch_size=batch_size,
                    max_padding=max_padding,
                    max_batch_tokens=max_batch_tokens,
                    max_decode_padding=max_decode_padding,
                ),
            )
            for plain in plain_tasks(task)  # a task scored twice runs once
        ]

    def _prepare(self, task: Task, settings: GenerationSettings) -> _PreparedTask:
        data = task.load_split(self.split)
        prompts = [task.build_prompt(example.question) for example in data.examples]
        contents = json.dumps(
            [task.fingerprint, prompts, [e.answer for e in data.examples], settings.result_defining()], ensure_ascii=False
        )
        fingerprint = hashlib.sha256(contents.encode()).hexdigest()[:16]
        encoded = encode_prompts(
            self.tokenizer, prompts, settings.batch_size, settings.max_padding, settings.max_batch_tokens,
            max_decode_padding=settings.max_decode_padding,
        )
        return _PreparedTask(task, data, prompts, encoded, settings, fingerprint)

    def cache_key(self, model_key: str) -> str:
        """model key | task | split | hash of the task config, prompts, golds and generation settings."""
        fingerprints = [self.task.fingerprint, *(p.fingerprint for p in self.prepared)]
        settings_hash = hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16]
        return f"{model_key}|{self.task.name}|{self.split}|{settings_hash}"

    def evaluate(self, model: torch.nn.Module, model_key: str | None = None) -> EvalResult:
        """Generate, score and aggregate; with a model_key, a cached result is returned without generating."""
        key = self.cache_key(model_key) if model_key is not None else None
        if key is not None and (cached := self.cache.get(key)) is not None:
            return cached
        component_metrics: dict[str, dict[str, Any]] = {}
        samples: list[dict[str, Any]] = []
        for prepared in self.prepared:
            metrics, task_samples = self._run(model, prepared)
            component_metrics[prepared.task.name] = metrics
            samples.extend(task_samples)
        if isinstance(self.task, CompositeTask):
            metrics = self.task.combine(component_metrics, self.split)
        else:
            metrics = component_metrics[self.task.name]
        result = EvalResult(
            task=self.task.name,
            split=self.split,
            model_key=model_key,
            metrics=metrics,
            samples=samples,
            generation={p.task.name: p.settings.result_defining() for p in self.prepared},
            data_sources={p.task.name: p.data.source for p in self.prepared},
        )
        if key is not None:
            self.cache.put(key, result)
        return result

    def evaluate_rows(self, model: torch.nn.Module, rows: Mapping[str, Sequence[int]]) -> dict[str, RowScores]:
        """Per plain task named in `rows`, the scores of those rows of the split only (indices into it), in the
        order given: a race scores each candidate on growing slices and compares candidates row by row. Not
        cached: a race never asks a candidate for the same rows twice."""
        results = {}
        for prepared in self.prepared:
            indices = tuple(rows.get(prepared.task.name, ()))
            if indices:
                _, scores, tokens = self._generate(model, self._subset(prepared, indices))
                results[prepared.task.name] = RowScores(tuple(scores), tuple(tokens))
        return results

    def _subset(self, prepared: _PreparedTask, indices: tuple[int, ...]) -> _PreparedTask:
        """`prepared` cut to the given rows, encoded once per task and slice (every candidate of a race's round
        asks for the same rows)."""
        kept = self._subsets.get(prepared.task.name)
        if kept is None or kept[0] != indices:
            if min(indices) < 0 or max(indices) >= len(prepared.prompts):
                raise IndexError(f"rows {min(indices)}..{max(indices)} asked of {prepared.task.name}/{self.split}, "
                                 f"which has {len(prepared.prompts)}")
            prompts = [prepared.prompts[i] for i in indices]
            data = replace(prepared.data, examples=tuple(prepared.data.examples[i] for i in indices))
            settings = prepared.settings
            encoded = encode_prompts(self.tokenizer, prompts, settings.batch_size, settings.max_padding,
                                     settings.max_batch_tokens, max_decode_padding=settings.max_decode_padding)
            kept = indices, replace(prepared, data=data, prompts=prompts, encoded=encoded)
            self._subsets[prepared.task.name] = kept
        return kept[1]

    def _generate(self, model: torch.nn.Module, prepared: _PreparedTask) -> tuple[list[str], list[SampleScore], list[int]]:
        """Each row's generation, its score and how many tokens the model generated for it."""
        generations = generate_encoded(
            model, self.tokenizer, prepared.encoded, prepared.settings, self.progress,
            f"{prepared.task.name}/{self.split}",
        )
        scores = prepared.task.score(generations, [example.answer for example in prepared.data.examples])
        return generations, scores, generations.tokens

    def _run(self, model: torch.nn.Module, prepared: _PreparedTask) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        generations, scores, tokens = self._generate(model, prepared)
        samples = [
            {
                "task": prepared.task.name,
                "index": index,
                "prompt": prompt,
                "generation": generation,
                "extracted": score.extracted,
                "gold": example.answer,
                "japanese_prob": score.japanese_prob,
                "correct": score.correct,
                "correct_ja": score.correct_ja,
            }
            for index, (prompt, generation, example, score) in enumerate(
                zip(prepared.prompts, generations, prepared.data.examples, scores))
        ]
        return prepared.task.metrics(scores, self.split, sum(tokens)), samples


GENERATION_OPTIONS = ("batch_size", "max_padding", "max_decode_padding", "max_batch_tokens", "max_new_tokens")


def generation_options(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """The Evaluator's generation options set in config mappings (a `task` group entry, overrides): for each
    option the first source that sets it (not None; 0 is a value) wins; unset ones keep the Evaluator's default."""
    options = {}
    for name in GENERATION_OPTIONS:
        values = [source.get(name) for source in sources if source.get(name) is not None]
        if values:
            options[name] = values[0]
    return options

