"""An offline W&B run read back from its transaction log, `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`.

wandb 0.31 has no Python reader of its own (its Go core writes and syncs the file), so this reads the format
directly: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB log records -- each a 4-byte checksum, a
2-byte little-endian length and a type byte (1 whole, 2 first, 3 middle, 4 last piece) -- in blocks of 32 KiB,
each holding one serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pieces = HEADER, []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the writer pads the end of a block with zeros
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pieces.append(data[position + HEADER:position + HEADER + length])
        position += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


@dataclass
class OfflineRun:
    """What one process logged to one W&B run."""

    directory: Path
    run_id: str = ""
    group: str = ""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step, "_step" and W&B's own keys too
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # name, type, files


def read_offline_run(directory: Path) -> OfflineRun:
    (log,) = directory.glob("run-*.wandb")
    run = OfflineRun(directory)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group = record.run.run_id, record.run.run_group
            run.name, run.project = record.run.display_name, record.run.project
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        elif kind == "summary":
            run.summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append((record.artifact.name, record.artifact.type,
                                  [entry.path for entry in record.artifact.manifest.contents]))
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline run W&B wrote under `run_dir`, oldest first (a resumed run: one per process)."""
    return [read_offline_run(path) for path in sorted((run_dir / "wandb").glob("offline-run-*"))]
