"""PNG plots of a search, drawn with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fitness(history: Sequence[Mapping[str, Any]], path: Path, objective: str) -> Path:
    """Best-so-far (confirmed candidates only), generation best and generation mean of the primary fitness, per
    generation; under racing, every candidate as a dot: filled where scored on every row, hollow where the value is
    an estimate on part of the split."""
    primary = [[f[0] for f in told["fitness"]] for told in history]
    confirmed = [told.get("confirmed", [True] * len(told["fitness"])) for told in history]
    generations = range(1, len(primary) + 1)
    best_so_far, running = [], float("-inf")
    for values, sure in zip(primary, confirmed):
        running = max([running, *(v for v, s in zip(values, sure) if s)])
        best_so_far.append(running if running > float("-inf") else float("nan"))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(generations, best_so_far, label="best so far (confirmed)", linewidth=2)
    ax.plot(generations, [max(v) for v in primary], label="generation best", marker=".")
    ax.plot(generations, [sum(v) / len(v) for v in primary], label="generation mean", linestyle="--")
    if any("confirmed" in told for told in history):  # a raced run: show which values are estimates
        points = [(g, v, s) for g, values, sure in zip(generations, primary, confirmed) for v, s in zip(values, sure)]
        ax.scatter([g for g, _, s in points if s], [v for _, v, s in points if s], s=14, color="black",
                   label="confirmed (every row)", zorder=4)
        ax.scatter([g for g, _, s in points if not s], [v for _, v, s in points if not s], s=14, facecolors="none",
                   edgecolors="grey", label="estimate (raced, part of the rows)", zorder=3)
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{objective} (search split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
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
