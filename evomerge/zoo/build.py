"""Build (or find cached) the toy zoo: task data, tokenizer, a pretrained base and fine-tuned experts, and a report.

A zoo lives in `<home>/zoo-<variant>-<hash>`, where the hash covers the whole spec, so changing the recipe builds a new
zoo and an unchanged one is found again. Stages are written into `<dir>.partial/` and skipped when already there, so
an interrupted build resumes; the directory is renamed into place only when the report is written.

Concurrent builds of one zoo (several processes, or a search and `evomerge zoo` at once) are safe: a build holds the
file lock `<dir>.lock` from start to rename, so only one process writes `<dir>.partial/`; the others wait (saying so
in one line) and then find the finished zoo instead of building it again. A finished zoo (one with
`zoo_report.json`) is never deleted; only an incomplete `<dir>` left by an older layout is, under the lock. On a
local disk the lock is an OS lock (flock): a killed build releases it, and the next build resumes its `<dir>.partial/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from transformers import MistralConfig, MistralForCausalLM

from evomerge.eval.task import load_task
from evomerge.modelio import load_model, load_tokenizer
from evomerge.zoo import corpus
from evomerge.zoo.report import zoo_report
from evomerge.zoo.tokenizer import train_tokenizer
from evomerge.zoo.train import finetune, mean_tail, pretrain

SPEC_VERSION = 2  # bump when code changes what a spec builds
# Every build trains with this many torch threads, whatever the machine has: the zoo's bits depend on it.
BUILD_THREADS = 2
TASKS = ("toy_ja_qa", "toy_en_math", "toy_ja_math")
OBJECTIVE = "toy_two_skill"  # both experts' skills in one model: the zoo's default search objective
REPORT_TASKS = (*TASKS, OBJECTIVE)


@dataclass(frozen=True)
class ExpertSpec:
    task: str  # the task whose training pairs the expert is fine-tuned on
    steps: int
    lr: float
    # [start, stop): the only decoder blocks fine-tuned (embeddings, norms and head stay the base's), so the skill
    # sits at that depth -- what gives layer paths room (conf/zoo/dfs.yaml); None: the whole model
    layers: tuple[int, int] | None = None


@dataclass(frozen=True)
class ZooSpec:
    """Everything a zoo is built from; its hash names the zoo directory."""

    variant: str = "full"
    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    pretrain_documents: int = 60000
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    pretrain_qa_fraction: float = 0.2  # share of generic Q:/A: reading comprehension in the base's pretraining
    batch_size: int = 32
    seq_len: int = 128
    expert_examples: int = 8000
    # The Japanese expert needs more steps to look facts up reliably (colour + object answers are the last to come);
    # both use lr 3e-4, which keeps the two task vectors of similar size (relative norms ~0.2 and ~0.15).
    experts: dict[str, ExpertSpec] = field(
        default_factory=lambda: {
            "ja_expert": ExpertSpec("toy_ja_qa", 800, 3e-4),
            "math_expert": ExpertSpec("toy_en_math", 300, 3e-4),
        }
    )
    split_sizes: dict[str, int] = field(default_factory=lambda: {"search": 100, "test": 200})
    # task-arithmetic weights (ja_expert, math_expert) tried by the merge probe
    probe_weights: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.75, 0.75), (1.0, 1.0), (0.75, 1.0), (1.0, 0.75))

    @classmethod
    def from_dict(cls, values: dict) -> ZooSpec:
        values = dict(values)
        if "experts" in values:
            values["experts"] = {name: _expert(name, spec, values.get("num_layers", cls.num_layers))
                                 for name, spec in values["experts"].items()}
        if "probe_weights" in values:
            values["probe_weights"] = tuple(tuple(w) for w in values["probe_weights"])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown zoo setting(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**values)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for expert in values["experts"].values():  # whole-model experts keep the hash they had before block ranges
            if expert["layers"] is None:
                del expert["layers"]
        return {"spec_version": SPEC_VERSION, **values}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def _expert(name: str, values: dict, num_layers: int) -> ExpertSpec:
    values = dict(values)
    if values.get("layers") is not None:
        start, stop = values["layers"] = tuple(values["layers"])
        if not 0 <= start < stop <= num_layers:
            raise ValueError(f"zoo expert {name}: layers [{start}, {stop}) is not a block range of a "
                             f"{num_layers}-layer model (0 <= start < stop <= {num_layers})")
    return ExpertSpec(**values)


def zoo_dir(spec: ZooSpec, home: str | Path) -> Path:
    return Path(home).expanduser() / f"zoo-{spec.variant}-{spec.hash}"


def build_zoo(spec: ZooSpec, home: str | Path) -> Path:
    """Return the zoo directory for `spec`, building whatever is missing."""
    final = zoo_dir(spec, home)
    if (final / "zoo_report.json").is_file():
        return final
    stages = {**_BASE_STAGES, "train_experts": _train_experts}
    return build_in_stages(
        final,
        {name: functools.partial(stage, spec) for name, stage in stages.items()},
        lambda work: zoo_report(work, spec.experts, REPORT_TASKS, spec.probe_weights, OBJECTIVE),
        spec.to_dict(),
    )


@contextlib.contextmanager
def zoo_base(spec: ZooSpec, home: str | Path) -> Iterator[Path]:
    """The directory holding `spec`'s `data/` and `base/`: the finished zoo if there is one, else its `.partial`
    build run up to the base only -- all a study zoo reuses (the experts and report it skips are 1,100 fine-tuning
    steps, ~20 min at the second model size); a later `build_zoo` resumes there. Held under the zoo's build lock
    while in use, so no concurrent build renames it away."""
    final = zoo_dir(spec, home)
    with staged_build(final, {name: functools.partial(stage, spec) for name, stage in _BASE_STAGES.items()}) as built:
        yield final if built is None else built[0]


@contextlib.contextmanager
def reproducible_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """A fixed thread count and deterministic kernels while a zoo is built, restored afterwards (they are no
    setting of the caller's). The thread count fixes the order of float sums in CPU kernels, hence the bits."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold `<final>.lock` for a whole build, so concurrent builds of one zoo never share `<final>.partial/` or
    replace a zoo another process is reading; say so when another process holds it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(final.with_name(final.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process building {final} (lock {lock.lock_file})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def staged_build(final: Path, stages: Mapping[str, Callable[[Path], None]]) -> Iterator[tuple[Path, dict] | None]:
    """Under `final`'s build lock: None when that zoo is finished, else its `.partial` directory after running
    `stages` there in order (a killed build resumes: each stage skips what it finished), with each stage's seconds.
    Torch stays reproducible until the caller is done."""
    with build_lock(final):
        if (final / "zoo_report.json").is_file():
            yield None
            return
        work = final.with_name(final.name + ".partial")
        work.mkdir(exist_ok=True)
        timings = {}
        with reproducible_torch():
            for name, stage in stages.items():
                started = time.perf_counter()
                stage(work)
                timings[name] = round(time.perf_counter() - started, 1)
            yield work, timings


def build_in_stages(
    final: Path, stages: Mapping[str, Callable[[Path], None]], report: Callable[[Path], dict], spec: dict
) -> Path:
    """Build a zoo with `staged_build`, then write `spec.json` and `zoo_report.json` (with each stage's seconds)
    and rename it into place; a zoo another process finished while this one waited is returned as it is."""
    with staged_build(final, stages) as built:
        if built is None:
            return final
        work, timings = built
        started = time.perf_counter()
        result = report(work)
        timings["report"] = round(time.perf_counter() - started, 1)
        (work / "spec.json").write_text(json.dumps(spec, indent=2))
        _write_json(work / "build.json", {"seconds": timings, "torch_threads": BUILD_THREADS})
        _write_json(work / "zoo_report.json", result)  # no timings in it: two builds of one spec give the same bytes
        if final.exists():  # a stale, incomplete directory from an older layout (no report: checked above)
            shutil.rmtree(final)
        work.rename(final)
    return final


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    tmp.replace(path)


def _eval_splits(spec: ZooSpec) -> dict[str, dict[str, list[corpus.Example]]]:
    return {task: corpus.task_splits(task, spec.seed, spec.split_sizes) for task in TASKS}


def _write_data(spec: ZooSpec, work: Path) -> None:
    for task, splits in _eval_splits(spec).items():
        folder = work / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, examples in splits.items():
            lines = "".join(json.dumps(e.row(), ensure_ascii=False) + "\n" for e in examples)
            (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


def _stage_done(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def new_base(spec: ZooSpec, tokenizer) -> MistralForCausalLM:
    """The zoo's untrained base: a Mistral of the spec's size, initialized from the spec's seed."""
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    return MistralForCausalLM(config)


def _train_base(spec: ZooSpec, work: Path) -> None:
    out = work / "base"
    if _stage_done(out):
        return
    held_out = {e.question for splits in _eval_splits(spec).values() for rows in splits.values() for e in rows}
    documents = corpus.pretraining_documents(spec.seed, spec.pretrain_documents, spec.pretrain_qa_fraction, held_out)
    tokenizer = train_tokenizer(documents[: max(2000, len(documents) // 10)], spec.vocab_size)
    model = new_base(spec, tokenizer)
    losses = pretrain(
        model, tokenizer, documents, steps=spec.pretrain_steps, batch_size=spec.batch_size,
        seq_len=spec.seq_len, lr=spec.pretrain_lr, seed=spec.seed, desc="zoo: base",
    )
    _save(model, tokenizer, out, {"final_loss": mean_tail(losses)})


_BASE_STAGES = {"write_data": _write_data, "train_base": _train_base}


def _train_experts(spec: ZooSpec, work: Path) -> None:
    held_out = {e.question for splits in _eval_splits(spec).values() for rows in splits.values() for e in rows}
    tokenizer = load_tokenizer(work / "base")
    for name, expert in spec.experts.items():
        out = work / name
        if _stage_done(out):
            continue
        task = load_task(expert.task, variables={"zoo_dir": str(work)})
        examples = corpus.training_examples(expert.task, spec.seed, spec.expert_examples, held_out)
        pairs = [(task.build_prompt(e.question), e.completion) for e in examples]
        model = load_model(work / "base")
        if expert.layers is not None:
            model.requires_grad_(False)
            model.model.layers[slice(*expert.layers)].requires_grad_(True)
        losses = finetune(
            model, tokenizer, pairs, steps=expert.steps, batch_size=spec.batch_size,
            lr=expert.lr, seed=spec.seed, desc=f"zoo: {name}",
        )
        _save(model, tokenizer, out, {"final_loss": mean_tail(losses), "task": expert.task})


def _save(model, tokenizer, out: Path, info: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
