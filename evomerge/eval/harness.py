"""lm-evaluation-harness tasks as fitness: lm-eval builds the requests and computes the metrics, evomerge answers them.

`task=lm_eval task.tasks=[mgsm_direct_ja]` scores candidates on any lm-eval task, `generate_until` or
`loglikelihood` / `multiple_choice`: lm-eval (a library here, its tasks never copied) renders prompts, few-shot
exemplars, filters and metrics exactly as `lm_eval.simple_evaluate` does, and `HarnessLM` answers its requests:

- `generate_until` with evomerge's batched, prefix-sharing greedy generator (`generate.py`), prompts encoded once
  per search and reused for every candidate;
- `loglikelihood` with a batched scorer and no generation: requests that share a context (a multiple-choice
  question's choices) read it once, one forward over a batch of distinct contexts whose KV cache, repeated per
  request, lets a second forward read every continuation's other tokens. Tokenization, truncation and the
  log-softmax dtype follow lm-eval's HF backend, so the numbers are its numbers (tests/test_harness.py).

Search and test rows: each task's evaluation docs (its test split, or validation where it has no test split) are
cut by a seeded permutation into a search share (`search_fraction`) and the rest, the test rows: never overlapping,
and recorded in the run's config. Each task's fitness is its first metric under its first filter (lm-eval's own
order, e.g. exact_match under gsm8k's strict-match) unless `metrics` names another; `score` is their mean. Only
metrics that lm-eval aggregates as a mean over rows qualify, so that per-row values add up to the fitness (the
held-out report's paired statistics need them).

Memory at 7B (Mistral-7B in bf16: 32 layers x 8 KV heads x 128 x 2 (keys, values) x 2 bytes = 131 kB of KV cache
per token): a log-likelihood batch of 16 distinct 1,000-token contexts holds 2.1 GB of cache, then that cache once
per request (64 rows for 4 choices: 8.4 GB, what lm-eval's HF backend also holds for 64 whole rows), plus logits of
requests x continuation tokens x 32,000 x 2 bytes and their log-softmax. `task.batch_size` and `max_batch_tokens`
bound it, as they bound generation's cache; the pool is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import lm_eval.api.task as lm_eval_task_module
import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.metrics import mean
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate as lm_eval_evaluate
from lm_eval.models.utils import normalize_gen_kwargs, resolve_max_length
from lm_eval.tasks import TaskManager
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import PreTrainedTokenizerBase

from evomerge.errors import TaskError, settings_problem
from evomerge.eval.evaluator import EvalResult, ResultCache
from evomerge.eval.generate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_DECODE_PADDING,
    DEFAULT_MAX_PADDING,
    EncodedPrompts,
    GenerationSettings,
    encode_prompts,
    cache_keyword,
    generate_encoded,
    length_runs,
    returned_cache,
)

HARNESS_TASK = "lm_eval"  # the `task` config entry's name that selects lm-eval tasks (conf/task/lm_eval.yaml)
SPLITS = ("search", "test")
OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood")  # not perplexity (loglikelihood_rolling)
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed


class HarnessSettings(BaseModel):
    """The `task=lm_eval` config entry (evomerge/conf/task/lm_eval.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["lm_eval"]
    tasks: list[str] = Field(min_length=1)  # lm-eval task (or group) names
    include_path: str | None = None  # a directory of one's own lm-eval task YAMLs
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own
    metrics: dict[str, str] = {}  # task -> "metric,filter" (lm-eval's result key) to use as its fitness
    search_fraction: float = Field(0.5, gt=0, lt=1)  # share of each task's docs searched on; the rest is test
    split_seed: int = 0
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    max_padding: float = Field(DEFAULT_MAX_PADDING, ge=0, lt=1)
    max_decode_padding: float = Field(DEFAULT_MAX_DECODE_PADDING, ge=0, lt=1)
    max_batch_tokens: int | None = Field(None, ge=1)

    @classmethod
    def load(cls, entry: Mapping[str, Any]) -> HarnessSettings:
        """The entry checked; its first problem as one TaskError line naming the key."""
        try:
            return cls.model_validate(dict(entry))
        except ValidationError as error:
            raise TaskError(settings_problem(error, "task.")) from None


@contextlib.contextmanager
def _quiet(progress: bool = False) -> Iterator[None]:
    """lm-eval logs its settings at INFO and WARNING on every evaluation, and draws a bar over the docs as it builds
    each task's requests: thousands of lines in a search. Its logger is raised to ERROR and, without `progress`,
    the bar of its task module is drawn disabled (it takes no setting), both only while lm-eval runs here."""
    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, lm_eval_task_module.tqdm
    logger.setLevel(logging.ERROR)
    if not progress:
        lm_eval_task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_eval_task_module.tqdm = bar


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> TaskManager:
    """lm-eval's index of its tasks (and of those under `include_path`): ~13 s to build, so once per process."""
    return TaskManager(include_path=include_path)


@dataclass(frozen=True)
class Objective:
    """One lm-eval task's fitness: its result key ("metric,filter") and the filter whose rows carry it."""

    metric: str
    filter: str

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


@dataclass(eq=False)
class HarnessTask:
    """lm-eval tasks, loaded once, and the seeded search/test cut of each one's evaluation docs."""

    settings: HarnessSettings
    name: ClassVar[str] = HARNESS_TASK

    def __repr__(self) -> str:
        return f"HarnessTask({self.settings.tasks})"

    @cached_property
    def loaded(self) -> dict[str, Any]:
        """lm-eval's `TaskManager.load` result, with `simple_evaluate`'s settings applied: num_fewshot (the task's
        own, 0 where it has none) and the few-shot seed."""
        include = self.settings.include_path
        if include is not None and not Path(include).expanduser().is_dir():
            raise TaskError(f"task.include_path={include!r} is not a directory of lm-eval task YAMLs")
        with _quiet():
            manager = _task_manager(str(Path(include).expanduser().resolve()) if include else None)
            try:
                loaded = manager.load(list(self.settings.tasks))
            except Exception as error:  # lm-eval raises KeyError / ValueError for an unknown task name
                raise TaskError(f"lm-eval could not load task.tasks={list(self.settings.tasks)}: "
                                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if not loaded["tasks"]:
            raise TaskError(f"lm-eval knows none of task.tasks={list(self.settings.tasks)}")
        for name, task in loaded["tasks"].items():
            output_type = task.get_config("output_type")
            if output_type not in OUTPUT_TYPES:
                raise TaskError(f"lm-eval task {name!r} is a {output_type} task; evomerge scores "
                                f"{', '.join(OUTPUT_TYPES)} tasks")
            if output_type == "generate_until" and (task.get_config("generation_kwargs") or {}).get("do_sample"):
                raise TaskError(f"lm-eval task {name!r} samples (do_sample: true); evomerge scores greedy "
                                "generations only")
            if self.settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.settings.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        return loaded

    @property
    def tasks(self) -> dict[str, Any]:
        return self.loaded["tasks"]

    @cached_property
    def objectives(self) -> dict[str, Objective]:
        """Each task's fitness metric, checked to be a mean over rows."""
        unknown = sorted(set(self.settings.metrics) - set(self.tasks))
        if unknown:
            raise TaskError(f"task.metrics names {unknown}, not tasks of this run ({sorted(self.tasks)})")
        objectives = {}
        for name, task in self.tasks.items():
            filters = [ensemble.name for ensemble in task._filters]
            known = [f"{metric},{filter_name}" for metric in task.aggregation() for filter_name in filters]
            key = self.settings.metrics.get(name, known[0] if known else "")
            if key not in known:
                raise TaskError(f"lm-eval task {name!r} has no metric {key!r}; its metrics are {known}")
            metric, filter_name = key.split(",", 1)
            if task.aggregation()[metric] is not mean:
                raise TaskError(f"lm-eval task {name!r}: metric {metric!r} is not a mean over rows, which evomerge's "
                                "fitness and paired statistics need (acc, exact_match, ...); set task.metrics")
            objectives[name] = Objective(metric, filter_name)
        return objectives

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever the settings or a task's config (prompts, metrics, generation kwargs) change; the same in
        every process (a function in a config counts by its name, not its address)."""
        configs = {name: task.dump_config() for name, task in self.tasks.items()}
        contents = json.dumps([self.settings.model_dump(), configs], sort_keys=True, ensure_ascii=False, default=_named)
        return hashlib.sha256(contents.encode()).hexdigest()[:16]

    def doc_indices(self, split: str) -> dict[str, list[int]]:
        """Per task, the indices of its evaluation docs in `split`: a seeded permutation of them, the first
        `search_fraction` of it searched on, the rest for test (each task seeded by its name as well, so adding a
        task leaves the others' cuts alone)."""
        if split not in SPLITS:
            raise TaskError(f"lm-eval tasks have the splits {list(SPLITS)} (a seeded cut of each task's docs), "
                            f"not {split!r}")
        indices = {}
        for name, task in self.tasks.items():
            count = len(task.eval_docs)
            searched = round(self.settings.search_fraction * count)
            if not 0 < searched < count:
                empty = "search" if searched == 0 else "test"
                raise TaskError(f"lm-eval task {name!r} has {count} docs: search_fraction="
                                f"{self.settings.search_fraction} leaves no {empty} rows")
            salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            order = np.random.default_rng([self.settings.split_seed, salt]).permutation(count)
            indices[name] = sorted(int(i) for i in (order[:searched] if split == "search" else order[searched:]))
        return indices

    def metric_names(self) -> list[str]:
        """What an evaluation yields: score (the mean of the tasks' fitness), n, tokens, and per task
        `<task>/score` and `<task>/<metric>` for each metric under its fitness filter."""
        names = ["score", "n", "tokens"]
        for name, task in self.tasks.items():
            names += [f"{name}/score", *(f"{name}/{metric}" for metric in task.aggregation())]
        return names

    def record(self) -> dict[str, Any]:
        """What a run records of the task: each lm-eval task's output type, generation kwargs, fitness metric,
        data source and search/test doc counts (the cut is reproducible from the settings)."""
        search, test = self.doc_indices("search"), self.doc_indices("test")
        return {name: {"output_type": task.get_config("output_type"),
                       "generation_kwargs": task.get_config("generation_kwargs"),
                       "num_fewshot": task.get_config("num_fewshot"),
                       "fitness": self.objectives[name].key,
                       "data": _data_source(task),
                       "docs": {"search": len(search[name]), "test": len(test[name])}}
                for name, task in self.tasks.items()}

    def row_values(self, samples: Sequence[Mapping[str, Any]], objective: str) -> tuple[list[float], list[bool]]:
        """Per test row: its value in `objective` (for `score`, its own task's fitness metric, unweighted: the
        paired statistics weigh the tasks equally, `significance.task_weighted`) and its 0/1 outcome (the row's
        metric is 1; exact for acc, exact_match)."""
        name, _, metric = objective.partition("/")
        if metric:
            samples = [sample for sample in samples if sample["task"] == name]
        elif objective != "score":
            raise ValueError(f"no per-row values average to metric {objective!r}")
        own = metric in ("", "score")  # each row's own task's fitness metric
        values = [float(sample["metrics"][self.objectives[sample["task"]].metric if own else metric]) for sample in samples]
        return values, [value == 1 for value in values]


def _named(value: Any) -> str:
    """A config value JSON cannot hold (a function, a filter object) by its qualified name."""
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"


def _data_source(task: Any) -> str:
    """Where a task's docs come from, as its config says: a hub dataset, or a function of one's own."""
    custom = task.get_config("custom_dataset")
    if custom is not None:
        return f"custom:{getattr(custom, '__module__', '?')}.{getattr(custom, '__name__', '?')}"
    name = task.get_config("dataset_name")
    return f"hub:{task.get_config('dataset_path')}" + (f"/{name}" if name else "")


class HarnessLM(TemplateLM):
    """lm-eval's model interface over an evomerge model (`TemplateLM`: lm-eval tokenizes log-likelihood pairs, this
    class scores them); `model` is swapped per candidate, the prompt encodings stay."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, batching: Mapping[str, Any], progress: bool = False) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.batching = dict(batching)
        self.progress = progress
        self.model: torch.nn.Module | None = None
        self.tokens = 0  # generated tokens since the last reset (what an evaluation cost)
        self._encoded: dict[tuple[tuple[str, ...], GenerationSettings], EncodedPrompts] = {}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request, as lm-eval's HF backend picks it."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return resolve_max_length(getattr(self.model, "config", None), self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """lm-eval's HF backend's encoding: the tokenizer's default special tokens, none if the text starts with BOS."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            options = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **options)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of (context, continuation) pairs (`TemplateLM`), its bar shown with `progress`."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        raise TaskError("lm-eval perplexity tasks (loglikelihood_rolling) are not a fitness evomerge computes; use "
                        "generate_until or multiple_choice tasks")

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it) per request. Requests
        that share a context (a multiple-choice question's choices) read it once: see `_score_shared`. A model
        without an HF config (no KV cache), and rows longer than the model, which lm-eval cuts from the left, are
        read whole instead (`_score_whole`)."""
        model = self._model()
        contexts = [context for _, context, _ in requests]
        continuations = [continuation for _, _, continuation in requests]
        shares = getattr(model, "config", None) is not None
        whole = [index for index in range(len(requests))
                 if not shares or len(contexts[index]) + len(continuations[index]) > self.max_length + 1]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        self._score_whole(model, whole, contexts, continuations, results)
        self._score_shared(model, sorted(set(range(len(requests))) - set(whole)), contexts, continuations, results)
        return results

    def _batches(self, lengths: Sequence[int]) -> Iterator[slice]:
        """Consecutive runs of `lengths` (sorted longest first) batched as prompts are: by rows, padding, tokens."""
        start = 0
        for size in length_runs(lengths, self.batching["max_padding"], self.batching["batch_size"],
                                self.batching.get("max_batch_tokens"), 0):
            yield slice(start, start + size)
            start += size

    @torch.inference_mode()
    def _score_shared(self, model: torch.nn.Module, indices: Sequence[int], contexts: Sequence[list[int]],
                      continuations: Sequence[list[int]], results: list[tuple[float, bool]]) -> None:
        """Each batch of distinct contexts (sorted by length, left-padded) is read in one forward; its last position
        scores every continuation's first token, and its KV cache, repeated for each request of the batch, lets one
        more forward read all their other tokens (right-padded): a 4-way question costs its context once, not 4
        times. Positions come from the attention mask, so each token has its place in its unpadded row."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index in indices:
            by_context.setdefault(tuple(contexts[index]), []).append(index)
        distinct = sorted(by_context, key=len, reverse=True)
        device = _device(model)
        for batch in self._batches([len(context) for context in distinct]):
            rows = distinct[batch]
            padded = self.tokenizer.pad({"input_ids": [list(row) for row in rows]}, padding=True, padding_side="left",
                                        return_tensors="pt")
            context_ids, context_mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            positions = (context_mask.cumsum(-1) - 1).clamp(min=0)
            outputs = model(input_ids=context_ids, attention_mask=context_mask, position_ids=positions, use_cache=True)
            first = F.log_softmax(outputs.logits[:, -1], dim=-1)  # each context's next-token log-probabilities
            members = [(row, index) for row, context in enumerate(rows) for index in by_context[context]]
            tails = [continuations[index][:-1] for _, index in members]
            width = max(len(tail) for tail in tails)
            if width:
                cache = returned_cache(outputs)
                selected = torch.tensor([row for row, _ in members], device=device)
                cache.reorder_cache(selected)  # one cache row per request (the batch's cache is not needed after)
                tail_ids = torch.zeros(len(members), width, dtype=torch.long, device=device)
                tail_mask = torch.zeros_like(tail_ids)
                for member, tail in enumerate(tails):
                    tail_ids[member, :len(tail)] = torch.tensor(tail)
                    tail_mask[member, :len(tail)] = 1
                tail_positions = positions[selected, -1:] + 1 + torch.arange(width, device=device)
                logits = model(input_ids=tail_ids, attention_mask=torch.cat([context_mask[selected], tail_mask], 1),
                               position_ids=tail_positions, use_cache=True, **{cache_keyword(model): cache}).logits
                rest = F.log_softmax(logits, dim=-1)
            for member, (row, index) in enumerate(members):
                scored = first[row][None]
                if len(tails[member]):
                    scored = torch.cat([scored, rest[member, :len(tails[member])]])
                results[index] = _continuation_score(scored, continuations[index])

    @torch.inference_mode()
    def _score_whole(self, model: torch.nn.Module, indices: Sequence[int], contexts: Sequence[list[int]],
                     continuations: Sequence[list[int]], results: list[tuple[float, bool]]) -> None:
        """Rows as lm-eval's HF backend builds them (cut to the model's length from the left), sorted by length,
        right-padded (a causal model's earlier positions never see the pads), one forward per batch."""
        rows = {index: (contexts[index] + continuations[index])[-(self.max_length + 1):][:-1] for index in indices}
        order = sorted(indices, key=lambda index: -len(rows[index]))
        keep_logits = "logits_to_keep" in _parameters(model)
        for batch in self._batches([len(rows[index]) for index in order]):
            members = order[batch]
            width = len(rows[members[0]])
            input_ids = torch.zeros(len(members), width, dtype=torch.long)
            for row, index in enumerate(members):
                input_ids[row, :len(rows[index])] = torch.tensor(rows[index])
            first = min(len(rows[index]) - len(continuations[index]) for index in members)  # first scored position
            logits = model(input_ids=input_ids.to(_device(model)),
                           **({"logits_to_keep": width - first} if keep_logits else {})).logits
            logprobs = F.log_softmax(logits[:, -(width - first):], dim=-1)  # in the model's dtype, as lm-eval's
            for row, index in enumerate(members):
                end = len(rows[index]) - first
                results[index] = _continuation_score(logprobs[row, end - len(continuations[index]):end],
                                                     continuations[index])

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the request's stop strings, by evomerge's generator; requests with the same
        generation kwargs are generated together, their prompts encoded once for all candidates."""
        model = self._model()
        by_kwargs: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_kwargs.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results = [""] * len(requests)
        for indices in by_kwargs.values():
            settings = self._settings(requests[indices[0]])
            contexts = tuple(requests[index].args[0] for index in indices)
            encoded = self._encoded.get((contexts, settings))
            if encoded is None:
                encoded = encode_prompts(self.tokenizer, contexts, settings.batch_size, settings.max_padding,
                                         settings.max_batch_tokens, max_decode_padding=settings.max_decode_padding)
                self._check_lengths(encoded, settings, requests[indices[0]].task_name)
                self._encoded[(contexts, settings)] = encoded
            generations = generate_encoded(model, self.tokenizer, encoded, settings, self.progress,
                                           requests[indices[0]].task_name or "lm_eval")
            self.tokens += sum(generations.tokens)
            for index, text in zip(indices, generations):
                results[index] = text
        return results

    def _settings(self, request: Any) -> GenerationSettings:
        """The request's generation kwargs as lm-eval normalizes them, decoded greedily (sampling tasks are refused
        as they load)."""
        kwargs = normalize_gen_kwargs(request.args[1], 256)  # 256: lm-eval's HF backend's max_gen_toks
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        stops = tuple(stop for stop in kwargs["until"] if stop and stop != eos)  # EOS ends a row as a token
        return GenerationSettings(max_new_tokens=int(kwargs["max_gen_toks"]), stop_strings=stops,
                                  **{key: value for key, value in self.batching.items() if value is not None})

    def _check_lengths(self, encoded: EncodedPrompts, settings: GenerationSettings, task: str | None) -> None:
        """lm-eval would cut prompts longer than the model's length less the answer's from the left: refused."""
        longest = max(group.input_ids.shape[1] for group in encoded.groups)
        room = self.max_length - settings.max_new_tokens
        if longest > room:
            raise TaskError(f"lm-eval task {task!r}: a prompt of {longest} tokens leaves no room for "
                            f"{settings.max_new_tokens} new tokens in the model's {self.max_length}")

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("HarnessLM.model is not set")
        return self.model


def _continuation_score(logprobs: torch.Tensor, continuation: Sequence[int]) -> tuple[float, bool]:
    """The continuation's log-probability from the log-probabilities at its positions, and whether each of its
    tokens is the likeliest there (lm-eval's `is_greedy`)."""
    target = torch.tensor(continuation, device=logprobs.device)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(dim=-1) == target).all())


def _parameters(model: torch.nn.Module) -> Mapping[str, Any]:
    return inspect.signature(model.forward).parameters


def _device(model: torch.nn.Module) -> torch.device:
    return getattr(model, "device", torch.device("cpu"))


class HarnessEvaluator:
    """Scores models on lm-eval tasks and one split, as `Evaluator` does on evomerge's own tasks: metrics (`score`
    the fitness), per-row samples, results cached under (model key, tasks, split, fingerprint)."""

    def __init__(self, task: HarnessTask, split: str, tokenizer: PreTrainedTokenizerBase, *,
                 cache: ResultCache | None = None, progress: bool = True, **batching: Any) -> None:
        settings = task.settings.model_dump()
        batching = {key: batching.get(key, settings[key])
                    for key in ("batch_size", "max_padding", "max_decode_padding", "max_batch_tokens")}
        self.task, self.split = task, split
        self.indices = task.doc_indices(split)
        self.lm = HarnessLM(tokenizer, batching, progress)
        self.cache = cache if cache is not None else ResultCache()

    def cache_key(self, model_key: str) -> str:
        return f"{model_key}|{self.task.name}:{','.join(self.task.tasks)}|{self.split}|{self.task.fingerprint}"

    def evaluate(self, model: torch.nn.Module, model_key: str | None = None) -> EvalResult:
        key = self.cache_key(model_key) if model_key is not None else None
        if key is not None and (cached := self.cache.get(key)) is not None:
            return cached
        self.lm.model, self.lm.tokens = model, 0
        with _quiet(self.lm.progress):
            output = lm_eval_evaluate(self.lm, self.task.loaded, samples=self.indices, bootstrap_iters=0,
                                      log_samples=True)
        metrics: dict[str, Any] = {}
        samples: list[dict[str, Any]] = []
        for name, objective in self.task.objectives.items():
            results = output["results"][name]
            metrics[f"{name}/score"] = float(results[objective.key])
            for task_key, value in results.items():
                metric, _, filter_name = task_key.partition(",")
                if filter_name == objective.filter and not metric.endswith("_stderr"):
                    metrics[f"{name}/{metric}"] = float(value)
            samples += [_sample(name, row, self.task.tasks[name]) for row in output["samples"][name]
                        if row["filter"] == objective.filter]
        metrics["score"] = float(np.mean([metrics[f"{name}/score"] for name in self.task.objectives]))
        metrics["n"] = sum(len(indices) for indices in self.indices.values())
        metrics["tokens"] = self.lm.tokens
        metrics["split"] = self.split
        tasks = self.task.tasks
        result = EvalResult(task=self.task.name, split=self.split, model_key=model_key, metrics=metrics,
                            samples=samples,
                            generation={name: task.get_config("generation_kwargs") for name, task in tasks.items()},
                            data_sources={name: _data_source(task) for name, task in tasks.items()})
        if key is not None:
            self.cache.put(key, result)
        return result


def _sample(name: str, row: Mapping[str, Any], task: Any) -> dict[str, Any]:
    """One logged lm-eval row as a report keeps it: the prompt, the model's answer to each of its requests (a
    generation, or a choice's (log-likelihood, is greedy)) before and after the task's filter, the gold, metrics."""
    return {"task": name, "index": int(row["doc_id"]), "prompt": row["arguments"][0][0],
            "responses": [response for responses in row["resps"] for response in responses],
            "filtered": json.loads(json.dumps(row["filtered_resps"], default=str)), "target": str(row["target"]),
            "metrics": {metric: float(row[metric]) for metric in task.aggregation() if metric in row}}
