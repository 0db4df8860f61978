"""PNG plots of a search, drawn with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fitness(history: Sequence[Mapping[str, Any]], path: Path, objective: str) -> Path:
    """Best-so-far, generation best and generation mean of the primary fitness, per generation."""
    primary = [[f[0] for f in told["fitness"]] for told in history]
    generations = range(1, len(primary) + 1)
    best_so_far, running = [], float("-inf")
    for values in primary:
        running = max(running, *values)
        best_so_far.append(running)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(generations, best_so_far, label="best so far", linewidth=2)
    ax.plot(generations, [max(v) for v in primary], label="generation best", marker=".")
    ax.plot(generations, [sum(v) / len(v) for v in primary], label="generation mean", linestyle="--")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{objective} (search split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
