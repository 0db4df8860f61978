"""The study's summary: means over subsets per (base kind, method, N), a markdown table, the four findings of
Yadav et al. (2024) checked against the numbers, and figures in the style of the paper's (matplotlib Agg)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from evomerge.study.run import normalized

KIND_LABELS = {"plain": "plain pretrained base", "it": "instruction-tuned base"}
METRICS = ("held_in_norm", "held_out_norm")


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(records: Sequence[Mapping[str, Any]], pool_info: Mapping[str, Any]) -> dict[str, Any]:
    """cells[kind][method][n] = {metric: mean, metric_std: std over subsets, subsets: count}; plus the references:
    each kind's experts on held-out tasks and its base on held-in tasks, both normalized like the merges."""
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["kind"], r["method"], r["n"])].append(r)
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for (kind, method, n), rows in groups.items():  # run order: base kinds, then N, then methods as configured
        cell: dict[str, Any] = {"subsets": len(rows)}
        for metric in METRICS:
            cell[metric] = _mean([r[metric] for r in rows])
            cell[f"{metric}_std"] = _std([r[metric] for r in rows])
        cells[kind][method][str(n)] = cell
    return {"cells": {k: dict(v) for k, v in cells.items()}, **pool_info}


def pool_info(pool) -> dict[str, Any]:
    """Reference scores: experts and bases on every task, and their normalized held-in / held-out means."""
    info: dict[str, Any] = {"held_in": list(pool.held_in), "held_out": list(pool.held_out), "references": {}}
    for kind in pool.kinds:
        own = {t: kind.expert_scores[t][t] for t in pool.held_in}
        experts_out = [normalized({t: scores[t] for t in pool.held_out}, kind.base_scores)[0]
                       for scores in kind.expert_scores.values()]
        info["references"][kind.name] = {
            "base_scores": dict(kind.base_scores),
            "expert_own_scores": own,
            "expert_scores": {t: dict(s) for t, s in kind.expert_scores.items()},
            # the base on held-in tasks, normalized by the experts: what merging must beat to keep any skill
            "base_held_in_norm": normalized({t: kind.base_scores[t] for t in pool.held_in}, own)[0],
            # a single expert on held-out tasks, normalized by the base: mean over experts
            "expert_held_out_norm": _mean(experts_out),
        }
    return info


def _by_n(summary, kind: str, metric: str, method: str | None = None) -> dict[int, float]:
    """metric per N for one method, or the mean over methods."""
    methods = summary["cells"].get(kind, {})
    chosen = [method] if method else list(methods)
    out = {}
    for n in sorted({int(n) for m in chosen for n in methods.get(m, {})}):
        values = [methods[m][str(n)][metric] for m in chosen if str(n) in methods.get(m, {})]
        mean = _mean(values)
        if mean is not None:
            out[n] = mean
    return out


def _overall(summary, kind: str, metric: str) -> float | None:
    return _mean(list(_by_n(summary, kind, metric).values()))


def findings(summary: Mapping[str, Any]) -> list[str]:
    """One paragraph per finding of the paper, each saying whether the miniature agrees, with its numbers."""
    kinds = list(summary["cells"])
    lines = []
    # 1: instruction-tuned base
    if {"plain", "it"} <= set(kinds):
        p_in, i_in = _overall(summary, "plain", "held_in_norm"), _overall(summary, "it", "held_in_norm")
        p_out, i_out = _overall(summary, "plain", "held_out_norm"), _overall(summary, "it", "held_out_norm")
        agree_in, agree_out = (i_in or 0) > (p_in or 0), (i_out or 0) > (p_out or 0)
        verdict = "agrees" if agree_in and agree_out else "partly agrees" if agree_in or agree_out else "does not agree"
        if None in (p_in, i_in, p_out, i_out):
            verdict = "cannot say (a reference score is 0, so a normalized mean is missing)"
        lines.append(
            f"**1. Instruction-tuned base merges better?** Mean over methods and N: held-in (normalized by the experts) "
            f"{_f(i_in)} from the instruction-tuned base vs {_f(p_in)} from the plain base; held-out (normalized by "
            f"each kind's own base) {_f(i_out)} vs {_f(p_out)}. The miniature {verdict}."
        )
    else:
        lines.append("**1. Instruction-tuned base merges better?** Not measured: this zoo has one base kind.")
    # 2: model size
    lines.append("**2. Larger models merge better?** Not measured: the study zoo has one model size (see above).")
    # 3: held-in vs held-out as N grows
    parts, agree = [], []
    for kind in kinds:
        hin, hout = _by_n(summary, kind, "held_in_norm"), _by_n(summary, kind, "held_out_norm")
        if len(hin) < 2:
            continue
        lo, hi = min(hin), max(hin)
        ref = summary["references"][kind]["expert_held_out_norm"]
        parts.append(
            f"{KIND_LABELS.get(kind, kind)}: held-in {hin[lo]:.3f} at N={lo} → {hin[hi]:.3f} at N={hi}, held-out "
            f"{_f(hout.get(lo))} → {_f(hout.get(hi))} (a single expert on held-out tasks: {_f(ref)})"
        )
        agree.append(hin[hi] < 1 and (hout.get(hi) or 0) >= (hout.get(lo) or 0) and (hout.get(hi) or 0) > (ref or 0))
    if parts:
        verdict = "agrees" if all(agree) else "partly agrees" if any(agree) else "does not agree"
        lines.append(
            "**3. Held-in vs held-out as N grows** (paper: merges trail the experts held-in but generalize better "
            "held-out, more so with more experts). Mean over methods: " + "; ".join(parts) + f". The miniature {verdict}."
        )
    # 4: methods similar
    parts = []
    spreads = {}
    for kind in kinds:
        methods = summary["cells"][kind]
        largest = max(int(n) for m in methods.values() for n in m)
        values = {m: methods[m][str(largest)]["held_in_norm"] for m in methods
                  if str(largest) in methods[m] and methods[m][str(largest)]["held_in_norm"] is not None}
        out_values = {m: methods[m][str(largest)]["held_out_norm"] for m in methods if str(largest) in methods[m]}
        if len(values) < 2:
            continue
        spreads[kind] = max(values.values()) - min(values.values())
        parts.append(
            f"{KIND_LABELS.get(kind, kind)} at N={largest}: held-in "
            + ", ".join(f"{m} {v:.3f}" for m, v in values.items())
            + f" (spread {spreads[kind]:.3f}); held-out " + ", ".join(f"{m} {_f(v)}" for m, v in out_values.items())
        )
    if parts:
        if {"plain", "it"} <= set(spreads):
            verdict = ("agrees: the methods are closer on the instruction-tuned base" if spreads["it"] < spreads["plain"]
                       else "does not agree: the methods are not closer on the instruction-tuned base")
        else:
            verdict = "can only say how far apart the methods are here"
        lines.append("**4. Methods similar at scale?** " + "; ".join(parts) + f". The miniature {verdict}.")
    return lines


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(summary: Mapping[str, Any]) -> str:
    sizes = sorted({int(n) for kind in summary["cells"].values() for m in kind.values() for n in m})
    header = "| base | method | " + " | ".join(f"N={n} held-in / held-out" for n in sizes) + " |"
    lines = [header, "|" + " --- |" * (2 + len(sizes))]
    for kind, methods in summary["cells"].items():
        for method, by_n in methods.items():
            cells = []
            for n in sizes:
                c = by_n.get(str(n))
                cells.append("" if c is None else f"{_f(c['held_in_norm'])} / {_f(c['held_out_norm'])}")
            lines.append(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    refs = []
    for kind, ref in summary["references"].items():
        refs.append(f"{kind}: base held-in {_f(ref['base_held_in_norm'])}, single expert held-out "
                    f"{_f(ref['expert_held_out_norm'])}")
    subsets = sorted({c["subsets"] for kind in summary["cells"].values() for m in kind.values() for c in m.values()})
    lines.append("")
    lines.append(f"Means over {'/'.join(map(str, subsets))} expert subsets per cell; held-in = merged score / the "
                 f"task's own expert's score, held-out = merged score / that base kind's base score (test split). "
                 f"References (same normalization): " + "; ".join(refs) + ".")
    return "\n".join(lines)


def experts_markdown(summary: Mapping[str, Any]) -> str:
    """The raw test scores the normalization divides by: each kind's base and each expert on its own task."""
    tasks = [*summary["held_in"], *summary["held_out"]]
    lines = ["| model | " + " | ".join(tasks) + " |", "|" + " --- |" * (1 + len(tasks))]
    for kind, ref in summary["references"].items():
        lines.append(f"| {kind} base | " + " | ".join(f"{ref['base_scores'][t]:.2f}" for t in tasks) + " |")
        lines.append(f"| {kind} expert (own task) | " + " | ".join(
            f"{ref['expert_own_scores'][t]:.2f}" if t in ref["expert_own_scores"] else "–" for t in tasks) + " |")
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], out: Path) -> list[Path]:
    """study_methods.png: held-in and held-out normalized scores against N, a line per method, a column per base
    kind (the paper's Figures 2-3); study_base_kinds.png: the mean over methods, a line per base kind."""
    kinds = list(summary["cells"])
    paths = []
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6.4), dpi=120, squeeze=False, sharey="row")
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for method, by_n in summary["cells"][kind].items():
                ns = sorted(int(n) for n in by_n if by_n[n][metric] is not None)
                ax.errorbar(ns, [by_n[str(n)][metric] for n in ns], yerr=[by_n[str(n)][f"{metric}_std"] for n in ns],
                            marker="o", capsize=3, label=method)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1,
                       label="expert" if metric == "held_in_norm" else "base")
            ax.set_title(f"{KIND_LABELS.get(kind, kind)}: {'held-in' if row == 0 else 'held-out'}", fontsize=9)
            ax.set_xlabel("experts merged (N)")
            ax.set_ylabel("normalized score")
            ax.grid(alpha=0.3)
            ax.set_xticks(sorted({int(n) for m in summary["cells"][kind].values() for n in m}))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "study_methods.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=120)
    for ax, metric in zip(axes, METRICS):
        for kind in kinds:
            by_n = _by_n(summary, kind, metric)
            ax.plot(list(by_n), list(by_n.values()), marker="o", label=KIND_LABELS.get(kind, kind))
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{'held-in' if metric == 'held_in_norm' else 'held-out'} (mean over methods)", fontsize=9)
        ax.set_xlabel("experts merged (N)")
        ax.set_ylabel("normalized score")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "study_base_kinds.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def report_markdown(summary: Mapping[str, Any]) -> str:
    """study.md: the table, the references and the findings, as pasted into the README."""
    return "\n\n".join([
        markdown(summary),
        "Test-split scores the normalization divides by (primary metric):",
        experts_markdown(summary),
        *findings(summary),
    ]) + "\n"
