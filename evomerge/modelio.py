"""Model I/O in one place: every HF model, tokenizer and checkpoint is read and written here.

Weights are read from safetensors only. A checkpoint that has only pickle weights (``pytorch_model.bin``, ``*.pt``)
is refused unless the user opts in (``allow_pickle: true``), and is then read with ``torch.load(weights_only=True)``,
which rebuilds tensors without running code from the file. A model's own Python code (``trust_remote_code``) never
runs unless asked for (``trust_remote_code: true``). The CLI sets both from the config with `set_load_policy`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass
class LoadPolicy:
    """What model loading may do beyond reading safetensors: both off unless the config asks."""

    allow_pickle: bool = False
    trust_remote_code: bool = False


POLICY = LoadPolicy()


def set_load_policy(*, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Set the process-wide policy (the CLI calls this with the config's `allow_pickle` / `trust_remote_code`)."""
    if not isinstance(allow_pickle, bool) or not isinstance(trust_remote_code, bool):
        raise ModelLoadError(f"allow_pickle and trust_remote_code must be true or false, got {allow_pickle!r}, "
                             f"{trust_remote_code!r}")
    POLICY.allow_pickle, POLICY.trust_remote_code = allow_pickle, trust_remote_code


def pickle_refusal(path: str | Path, files: Sequence[Path]) -> str:
    names = ", ".join(sorted(file.name for file in files)[:3])
    return (f"checkpoint {path} has only pickle weights ({names}), which evomerge does not read by default: a pickle "
            "can run code when loaded. Convert it to safetensors, or set allow_pickle=true to load it with "
            "torch.load(weights_only=True)")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def local_checkpoint(path: str | Path, what: str = "model") -> str:
    """A local directory for ``path``: the path itself, or a hub id's cached (downloaded) snapshot of its
    safetensors, config and tokenizer files. A hub id may pin a revision, ``org/name@<branch, tag or commit>``;
    without one it is the default branch. Raises ModelLoadError naming the model when that cannot be had."""
    path = str(path)
    if _looks_local(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            raise ModelLoadError(f"{what} {path!r} is not a model directory (no such directory)")
        return str(local)
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(path)
    if revision == "":
        raise ModelLoadError(f"{what} {path!r} names no revision after '@': write {repo_id}@<branch, tag or commit>, "
                             f"or {repo_id} for its default branch")
    offline = hub_offline()
    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
    if POLICY.allow_pickle:
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    if POLICY.trust_remote_code:
        patterns.append("*.py")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except Exception as error:  # offline with no cached copy, unknown repo, no network: one line naming the model
        raise ModelLoadError(_hub_problem(path, what, error, offline)) from None


def split_revision(name: str) -> tuple[str, str | None]:
    """A hub id and the revision it pins (``org/name@rev``; a hub id itself never has an '@'), or None."""
    repo_id, at, revision = name.partition("@")
    return repo_id, (revision if at else None)


_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_snapshot(path: str | Path) -> tuple[str, str] | None:
    """``(hub id, commit)`` when ``path`` is a model snapshot in a Hugging Face hub cache, else None.

    The cache's documented layout (huggingface_hub's "manage the cache" guide; what ``snapshot_download`` returns
    and ``scan_cache_dir`` parses) is ``<cache>/models--<org>--<name>/snapshots/<commit sha>/``, '/' in the id
    written as '--', which a hub id never contains. Read from the path alone, so it holds wherever the cache lies."""
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    local = Path(path).expanduser()
    repo, snapshots = local.parent.parent.name, local.parent.name
    prefix = f"models{REPO_ID_SEPARATOR}"
    if snapshots != "snapshots" or not _COMMIT.fullmatch(local.name) or not repo.startswith(prefix):
        return None
    return repo[len(prefix):].replace(REPO_ID_SEPARATOR, "/"), local.name


def _hub_problem(path: str, what: str, error: BaseException, offline: bool) -> str:
    if offline:
        return (f"{what} {path!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1) with no cached "
                "copy of it: give a local path, or download it where the hub is reachable")
    return f"{what} {path!r} is not a local directory and could not be fetched from the hub: {error_line(error)}"


def _pickle_only(path: Path) -> list[Path]:
    """The pickle weight files of a directory that has no safetensors weights (empty if it has safetensors)."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return []
    return [file for file in path.iterdir() if file.suffix in PICKLE_SUFFIXES and file.is_file()]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id (via the local hub cache): safetensors, or pickle weights
    only when allowed and then with weights_only=True; the model's own code only when allowed."""
    local = local_checkpoint(path)
    pickled = _pickle_only(Path(local))
    if pickled and not POLICY.allow_pickle:
        raise ModelLoadError(pickle_refusal(path, pickled))
    for weights in sorted(Path(local).glob("*.safetensors")):  # transformers would say only "invalid header length"
        _check_safetensors(weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local, dtype=resolve_dtype(dtype), use_safetensors=None if POLICY.allow_pickle else True,
            weights_only=True, trust_remote_code=POLICY.trust_remote_code,
        )
    except OSError as error:  # no weights, no config: transformers' message is a paragraph
        raise ModelLoadError(f"model {path} could not be loaded: {error_line(error)}") from None
    except ValueError as error:
        raise ModelLoadError(_value_problem(path, "model", error)) from None
    from evomerge.pathmodel import is_path_model_dir, load_path_model  # here: pathmodel imports the merge engine

    if is_path_model_dir(local):  # a DFS layer path: its stored blocks, run in the path's order
        model = load_path_model(local, model)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    local = local_checkpoint(path, "tokenizer of")
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=POLICY.trust_remote_code)
    except OSError as error:
        raise ModelLoadError(f"tokenizer of {path} could not be loaded: {error_line(error)}") from None
    except ValueError as error:
        raise ModelLoadError(_value_problem(path, "tokenizer of", error)) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _value_problem(path: str | Path, what: str, error: ValueError) -> str:
    if "trust_remote_code" in str(error):
        return (f"{what} {path} needs its own Python code to load (trust_remote_code), which evomerge does not run "
                "by default; set trust_remote_code=true only if you trust that code")
    return f"{what} {path} could not be loaded: {error_line(error)}"


def error_line(error: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what a one-line error quotes."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------- safetensors, one tensor at a time
# The merge engine never holds a whole model: it reads the tensors of one parameter from every input, merges
# them, and appends the result to an output shard whose header was written up front.

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit: file, absolute byte range, dtype and shape."""

    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _corrupt(file: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{file}: not a valid safetensors file (truncated or corrupt: {reason})")


def _check_safetensors(file: Path) -> tuple[int, dict[str, dict]]:
    """The data offset and tensor entries of a safetensors file, checked against the file's size before they are
    trusted, so that a truncated or corrupt file is one ModelLoadError naming it (not a bare JSON error, a
    MemoryError from a garbage length, or a short read halfway through a merge). Dtypes are not checked here."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if len(prefix) < 8 or 8 + header_size > size:
            raise _corrupt(file, f"the file has {size} bytes, " + (
                "too few for a header" if len(prefix) < 8 else f"ending inside its {header_size}-byte header"))
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise _corrupt(file, f"its header is not JSON: {error_line(error)}") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in entries.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and all(type(n) is int and n >= 0 for n in info["shape"])):
            raise _corrupt(file, f"tensor {name!r} has no valid dtype, shape and data_offsets in the header")
    needed = max((info["data_offsets"][1] for info in entries.values()), default=0)
    if 8 + header_size + needed != size:
        raise _corrupt(file, f"its tensors need {needed} bytes of data, the file has {size - 8 - header_size}")
    return 8 + header_size, entries


def _read_header(file: Path) -> dict[str, TensorEntry]:
    data_start, header = _check_safetensors(file)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _corrupt(file, f"tensor {name!r} takes {end - begin} bytes, its shape {list(shape)} needs "
                                 f"{math.prod(shape) * dtype.itemsize}")
        entries[name] = TensorEntry(file, data_start + begin, data_start + end, dtype, shape)
    return entries


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (sharded via its index, or a single file): safetensors, or
    pickle files when the load policy allows them and the directory has no safetensors."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not POLICY.allow_pickle:
            raise ModelLoadError(pickle_refusal(path, [path]))
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (merging needs local safetensors directories)")
    index = path / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if (path / SAFETENSORS_SINGLE).exists():
        return [path / SAFETENSORS_SINGLE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = _pickle_only(path)
    if pickled and not POLICY.allow_pickle:
        raise ModelLoadError(pickle_refusal(path, pickled))
    if (path / PICKLE_INDEX).exists():
        weight_map = json.loads((path / PICKLE_INDEX).read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if pickled:
        return sorted(pickled)
    raise FileNotFoundError(f"checkpoint {path} has no safetensors files")


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict read with weights_only=True (tensors and plain containers only; no code runs)."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"{file}: not a weights-only pickle state dict ({type(error).__name__}: "
                             f"{error_line(error)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{file}: not a state dict of tensors")
    return state


def read_config(path: str | Path) -> dict:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


class CheckpointReader:
    """Lazy per-tensor reader over a (possibly sharded) safetensors checkpoint; only headers are read up front."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self._pickled: dict[str, torch.Tensor] = {}  # tensors of pickle files (allow_pickle only)
        for file in checkpoint_files(self.path):
            if file.suffix in PICKLE_SUFFIXES:
                for name, tensor in _load_pickle(file).items():
                    self._pickled[name] = tensor
                    nbytes = tensor.numel() * tensor.element_size()
                    self.entries[name] = TensorEntry(file, 0, nbytes, tensor.dtype, tuple(tensor.shape))
            else:
                self.entries.update(_read_header(file))
        self._handles: dict[Path, BinaryIO] = {}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((entry.end - entry.start for entry in self.entries.values()), default=0)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """``name``'s values in memory of their own (not a view of a mapped file): a fresh tensor, or the
        front of ``buffer`` (uint8, large enough) so a streaming caller can reuse one allocation."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        if name in self._pickled:
            values = self._pickled[name]
            if buffer is None:
                return values.clone()
            out = buffer[: entry.end - entry.start].view(entry.dtype).reshape(entry.shape)
            return out.copy_(values)
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)
        nbytes = entry.end - entry.start
        buffer = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        handle.seek(entry.start)
        view = memoryview(buffer.numpy())
        filled = 0
        while filled < len(view):
            count = handle.readinto(view[filled:])
            if not count:  # the file shrank after its header was checked
                raise _corrupt(entry.file, f"tensor {name!r} ends past the end of the file")
            filled += count
        return buffer.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Streams tensors into safetensors shards planned from their dtypes and shapes.

    Because each shard's header is written before its data, a tensor can be written and freed right after
    it is merged; tensors must arrive in the planned order.  Writes ``model.safetensors`` for one shard,
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` otherwise.
    """

    def __init__(
        self,
        directory: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = 2 * 1024**3,
    ):
        self.directory = Path(directory)
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        shard_bytes = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if self._shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                self._shards.append([])
                shard_bytes = 0
            self._shards[-1].append((name, dtype, tuple(shape), nbytes))
            shard_bytes += nbytes
        count = len(self._shards)
        self.file_names = (
            [SAFETENSORS_SINGLE]
            if count == 1
            else [f"model-{index + 1:05d}-of-{count:05d}.safetensors" for index in range(count)]
        )
        self._order = [(shard, entry) for shard, entries in enumerate(self._shards) for entry in entries]
        self._next = 0
        self._handle: BinaryIO | None = None

    def _open_shard(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in self._shards[shard]:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.directory / self.file_names[shard], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is beyond the planned layout")
        shard, (expected, dtype, shape, _) = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"writer expected {expected!r} {dtype} {list(shape)}, got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        if self._next == 0 or self._order[self._next - 1][0] != shard:
            self._close_shard()
            self._open_shard(shard)
        assert self._handle is not None
        self._handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and, for several shards, write the index; fails if tensors are missing."""
        self._close_shard()
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self._shards) > 1:
            weight_map = {
                name: self.file_names[shard] for shard, entries in enumerate(self._shards) for name, *_ in entries
            }
            total = sum(nbytes for entries in self._shards for *_, nbytes in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        self._close_shard()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a flat tensor dict as safetensors atomically (temp file, then rename) so readers never see half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(partial))
    partial.replace(path)
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_safetensors(Path(path))  # a truncated or corrupt file: one line naming it, not safetensors' bare error
    return load_file(str(path))
