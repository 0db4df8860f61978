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


def plot_pareto(entries: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]],
                chosen: Mapping[str, Any], path: Path, objective: str) -> Path:
    """Every evaluated path (primary objective against path length), the Pareto front and the chosen point."""
    done = [e for e in entries if e["error"] is None and not e["cached"]]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    ax.scatter([e["metrics"]["path_length"] for e in done], [e["fitness"][0] for e in done], s=10, alpha=0.35,
               color="grey", label="evaluated")
    ordered = sorted(front, key=lambda e: e["metrics"]["path_length"])
    ax.plot([e["metrics"]["path_length"] for e in ordered], [e["fitness"][0] for e in ordered], marker="o",
            color="tab:blue", label="Pareto front")
    ax.scatter([chosen["metrics"]["path_length"]], [chosen["fitness"][0]], marker="*", s=220, color="tab:red",
               zorder=5, label="chosen")
    ax.set_xlabel("path length (blocks run per token)")
    ax.set_ylabel(f"{objective} (search split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
