"""Layer groups found from checkpoint tensor names, so per-group recipe values work for any decoder-only LM.

Every tensor falls in exactly one of: ``embed`` (token/position embeddings), block ``i`` (anything under
``<prefix>.layers.i.`` / ``.h.i.`` / ``.blocks.i.``) or ``head`` (everything after the blocks: final norm,
LM head).  A recipe names groups as ``embed``, ``head``, ``blocks`` (all blocks), ``blocks.3`` or
``blocks.0-5`` (inclusive range); together they must cover each tensor exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from evomerge.errors import MergeError

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|decoder_layers)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_positions|embeddings?|wte|wpe|word_embeddings)(?:\.|$)")
_GROUP_NAME = re.compile(r"^(embed|head|blocks)(?:\.(\d+)(?:-(\d+))?)?$")


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor sits in the model: ``embed``, ``block`` (with its index) or ``head``."""

    kind: str
    block: int | None = None


def tensor_place(name: str) -> TensorPlace:
    match = _BLOCK_INDEX.search(name)
    if match:
        return TensorPlace("block", int(match.group(1)))
    if _EMBEDDING.search(name):
        return TensorPlace("embed")
    return TensorPlace("head")


def count_blocks(tensor_names: Iterable[str]) -> int:
    """Number of transformer blocks; block indices must run 0..n-1 without gaps."""
    indices = {place.block for place in map(tensor_place, tensor_names) if place.kind == "block"}
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise MergeError(f"checkpoint has gaps in its block indices (missing blocks {missing})")
    return len(indices)


@dataclass(frozen=True)
class GroupSelector:
    """A parsed group name: ``kind`` plus an inclusive block range (``None`` bounds mean all blocks)."""

    kind: str
    first: int | None = None
    last: int | None = None

    def covers(self, place: TensorPlace) -> bool:
        if place.kind != self.kind:
            return False
        if place.kind != "block" or self.first is None:
            return True
        assert place.block is not None and self.last is not None
        return self.first <= place.block <= self.last

    def overlaps(self, other: GroupSelector) -> bool:
        if self.kind != other.kind:
            return False
        if self.first is None or other.first is None:
            return True
        assert self.last is not None and other.last is not None
        return self.first <= other.last and other.first <= self.last


def parse_group_name(name: str) -> GroupSelector:
    match = _GROUP_NAME.match(name)
    if not match:
        raise MergeError(
            f"unknown layer group {name!r}; use 'embed', 'head', 'blocks', 'blocks.I' or 'blocks.I-J'"
        )
    word, first, last = match.groups()
    if word != "blocks":
        if first is not None:
            raise MergeError(f"layer group {name!r}: only 'blocks' takes an index")
        return GroupSelector(word)
    kind = "block"
    if first is None:
        return GroupSelector(kind)
    first_index = int(first)
    last_index = int(last) if last is not None else first_index
    if last_index < first_index:
        raise MergeError(f"layer group {name!r}: range end comes before its start")
    return GroupSelector(kind, first_index, last_index)


def check_disjoint(names: Sequence[str]) -> None:
    selectors = [parse_group_name(name) for name in names]
    for i, selector in enumerate(selectors):
        for j in range(i):
            if selector.overlaps(selectors[j]):
                raise MergeError(f"layer groups {names[j]!r} and {names[i]!r} overlap")


def assign_groups(tensor_names: Iterable[str], names: Sequence[str]) -> dict[str, int]:
    """Map each tensor to the index of the one group in ``names`` that covers it."""
    check_disjoint(names)
    selectors = [parse_group_name(name) for name in names]
    assignment: dict[str, int] = {}
    for tensor in tensor_names:
        place = tensor_place(tensor)
        owners = [index for index, selector in enumerate(selectors) if selector.covers(place)]
        if not owners:
            where = f"block {place.block}" if place.kind == "block" else place.kind
            raise MergeError(f"tensor {tensor!r} ({where}) is in none of the recipe's groups {list(names)}")
        assignment[tensor] = owners[0]
    return assignment


def block_ranges(n_blocks: int, n_ranges: int) -> list[tuple[int, int]]:
    """Split blocks 0..n_blocks-1 into ``n_ranges`` contiguous inclusive ranges whose sizes differ by at most one."""
    if n_blocks < 1:
        raise MergeError(f"cannot split {n_blocks} blocks into ranges")
    if not 1 <= n_ranges <= n_blocks:
        raise MergeError(f"cannot split {n_blocks} blocks into {n_ranges} ranges; choose 1..{n_blocks}")
    size, extra = divmod(n_blocks, n_ranges)
    ranges, start = [], 0
    for index in range(n_ranges):
        stop = start + size + (1 if index < extra else 0)
        ranges.append((start, stop - 1))
        start = stop
    return ranges


def group_names(n_blocks: int, n_ranges: int) -> list[str]:
    """Group names tiling a model: ``embed``, ``n_ranges`` block ranges, ``head``."""
    names = ["embed"]
    for first, last in block_ranges(n_blocks, n_ranges):
        names.append(f"blocks.{first}" if first == last else f"blocks.{first}-{last}")
    names.append("head")
    return names
