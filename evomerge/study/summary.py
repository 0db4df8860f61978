"""The study's summary: per (base kind, method, N) the normalized scores with bootstrap 95% intervals, the findings
of Yadav et al. (2024) each decided by an interval (agrees / disagrees / undetermined, never by point estimates), a
markdown report and figures in the style of the paper's (matplotlib Agg).

Every interval comes from one set of draws (`evomerge.study.intervals`): the same test questions and the same expert
subsets in every replicate, so a finding's difference between kinds, sizes, methods or N is paired.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from evomerge.study.intervals import Draws, combined, interval, mean_of, normalized, slope, verdict
from evomerge.study.run import EVOLVED

KIND_LABELS = {"plain": "plain pretrained base", "it": "instruction-tuned base"}
METRICS = ("held_in_norm", "held_out_norm")


def pool_info(pools: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """What the summary normalizes by: per base kind (of every zoo, i.e. model size, smallest first), the base's
    and each expert's 0/1 test rows; the zoos' sizes and expert gates."""
    first = pools[0][1]
    gates = [pool.gate for _, pool in pools if pool.gate]
    return {
        "held_in": list(first.held_in),
        "held_out": list(first.held_out),
        "gate": {"threshold": gates[0]["threshold"], "failed": {n: s for g in gates for n, s in g["failed"].items()}}
        if gates else None,
        "zoos": [{"name": name, "path": str(pool.zoo), "parameters": pool.parameters,
                  "kinds": [kind.name for kind in pool.kinds]} for name, pool in pools],
        "references": {kind.name: {"base_rows": dict(kind.base_rows), "expert_rows": dict(kind.expert_rows)}
                       for _, pool in pools for kind in pool.kinds},
    }


class _Arrays:
    """Every number of the study as replicate arrays (index 0: the point estimate)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], info: Mapping[str, Any], seed: int):
        questions = {}
        for ref in info["references"].values():
            questions.update({t: len(rows) for t, rows in ref["base_rows"].items()})
        subsets: dict[int, list[tuple[str, ...]]] = defaultdict(list)
        for r in records:  # run order: N, then subsets in their drawn order
            if tuple(r["subset"]) not in subsets[r["n"]]:
                subsets[r["n"]].append(tuple(r["subset"]))
        self.subsets = dict(subsets)
        self.draws = Draws(questions, {n: len(s) for n, s in subsets.items()}, seed=seed)
        self.base: dict[str, dict[str, np.ndarray]] = {}
        self.experts: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for kind, ref in info["references"].items():
            self.base[kind] = {t: self.draws.score(t, rows) for t, rows in ref["base_rows"].items()}
            self.experts[kind] = {e: {t: self.draws.score(t, rows) for t, rows in by_task.items()}
                                  for e, by_task in ref["expert_rows"].items()}
        per_subset: dict[tuple[str, str, int], dict[tuple[str, ...], dict[str, np.ndarray]]] = defaultdict(dict)
        for r in records:
            if "rows" not in r:
                raise ValueError("results.jsonl was written by an older evomerge study (no per-question rows); "
                                 "start a new run directory")
            kind = r["kind"]
            scores = {t: self.draws.score(t, rows) for t, rows in r["rows"].items()}
            own = {t: self.experts[kind][t][t] for t in r["subset"]}
            per_subset[(kind, r["method"], r["n"])][tuple(r["subset"])] = {
                "held_in_norm": normalized({t: scores[t] for t in r["subset"]}, own),
                "held_out_norm": normalized({t: scores[t] for t in info["held_out"]}, self.base[kind]),
            }
        missing = np.full(self.draws.replicates + 1, np.nan)  # a subset a run cut short has not merged yet
        self.cells: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]] = defaultdict(lambda: defaultdict(dict))
        self.counts: dict[tuple[str, str, int], int] = {}
        for (kind, method, n), by_subset in per_subset.items():
            self.counts[(kind, method, n)] = len(by_subset)
            self.cells[kind][method][n] = {
                metric: self.draws.over_subsets(n, [by_subset.get(s, {}).get(metric, missing) for s in subsets[n]])
                for metric in METRICS
            }

    def kinds(self) -> list[str]:
        return list(self.cells)

    def sizes(self, kind: str) -> list[int]:
        return sorted({n for by_n in self.cells[kind].values() for n in by_n})

    def uniform(self, kind: str) -> list[str]:
        return [m for m in self.cells[kind] if m != EVOLVED]

    def over_methods(self, kind: str, metric: str, n: int | None = None) -> np.ndarray:
        """The mean over the uniform methods (and over N when n is None)."""
        return mean_of(by_n[size][metric] for m, by_n in self.cells[kind].items() if m != EVOLVED
                       for size in by_n if n is None or size == n)

    def base_held_in(self, kind: str, held_in: Sequence[str]) -> np.ndarray:
        return normalized({t: self.base[kind][t] for t in held_in}, {t: self.experts[kind][t][t] for t in held_in})

    def expert_held_out(self, kind: str, held_out: Sequence[str]) -> np.ndarray:
        """A single expert on the held-out tasks, normalized by the base: mean over the kind's experts."""
        return mean_of(normalized({t: scores[t] for t in held_out}, self.base[kind])
                       for scores in self.experts[kind].values())


def few_answers(info: Mapping[str, Any], min_right: int) -> dict[str, dict[str, list[int]]]:
    """The held-out tasks some base answers fewer than `min_right` questions of: {task: {kind: [right, total]}}.
    Such a normalizer is a handful of answers (at 5, one answer more moves every ratio over it by a sixth), so the
    study leaves the task out of every held-out mean, for all kinds and sizes alike: one task set per study."""
    few: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for kind, ref in info["references"].items():
        for task in info["held_out"]:
            rows = ref["base_rows"][task]
            if sum(rows) < min_right:
                few[task][kind] = [sum(rows), len(rows)]
    return dict(few)


def summarize(records: Sequence[Mapping[str, Any]], info: Mapping[str, Any], seed: int = 0,
              held_out_min_right: int = 0) -> dict[str, Any]:
    """cells[kind][method][n] = {held_in_norm: interval, held_out_norm: interval, subsets}; references and their
    intervals; the findings (each part's interval and verdict, and the finding's verdict). Held-out means leave
    out the tasks `few_answers` names (`held_out_left_out`)."""
    left_out = few_answers(info, held_out_min_right)
    if left_out and len(left_out) == len(info["held_out"]):
        raise ValueError(f"study: every held-out task has a base answering fewer than {held_out_min_right} of its "
                         f"questions ({left_out}); lower study.held_out_min_right")
    info = {**info, "held_out": [t for t in info["held_out"] if t not in left_out]}
    arrays = _Arrays(records, info, seed)
    cells = {kind: {method: {str(n): {**{m: interval(values[m]) for m in METRICS},
                                      "subsets": arrays.counts[(kind, method, n)]}
                             for n, values in sorted(by_n.items())}
                    for method, by_n in methods.items()}
             for kind, methods in arrays.cells.items()}
    references = {}
    for kind in arrays.kinds():
        references[kind] = {
            "base_scores": {t: float(v[0]) for t, v in arrays.base[kind].items()},
            "expert_own_scores": {t: float(arrays.experts[kind][t][t][0]) for t in info["held_in"]},
            # the base on held-in tasks, normalized by the experts: what merging must beat to keep any skill
            "base_held_in_norm": interval(arrays.base_held_in(kind, info["held_in"])),
            "expert_held_out_norm": interval(arrays.expert_held_out(kind, info["held_out"])),
        }
    return {
        "cells": cells,
        "references": references,
        "held_in": list(info["held_in"]),
        "held_out": list(info["held_out"]),
        "held_out_left_out": left_out,
        "held_out_min_right": held_out_min_right,
        "gate": info.get("gate"),
        "zoos": [dict(zoo) for zoo in info["zoos"]],
        "subsets": {str(n): [list(s) for s in subsets] for n, subsets in arrays.subsets.items()},
        "replicates": arrays.draws.replicates,
        # the mean over the uniform methods per kind, metric and N (the paper's base-kind curves)
        "over_methods": {kind: {metric: {str(n): interval(arrays.over_methods(kind, metric, n))
                                         for n in arrays.sizes(kind)} for metric in METRICS}
                         for kind in arrays.kinds()},
        "findings": findings(arrays, info),
    }


def _part(label: str, values: np.ndarray) -> dict[str, Any]:
    estimate = interval(values)
    return {"label": label, **estimate, "verdict": verdict(estimate)}


def _finding(title: str, claim: str, parts: list[dict[str, Any]], absent: str | None = None) -> dict[str, Any]:
    if absent:
        return {"title": title, "claim": claim, "parts": [], "verdict": "not measured", "why": absent}
    return {"title": title, "claim": claim, "parts": parts, "verdict": combined([p["verdict"] for p in parts])}


def findings(arrays: _Arrays, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's four findings and evomerge's own question (does evolution's margin grow with N?), each as
    differences the claim says are positive, with intervals and verdicts. Finding 2 compares the model sizes
    (zoos); the others are read at the first (smallest) size."""
    zoos = info["zoos"]
    kinds = [kind for kind in zoos[0]["kinds"] if kind in arrays.cells]
    out = []
    title, claim = "1. Instruction-tuned base merges better?", "merges from the instruction-tuned base score higher"
    if {"plain", "it"} <= set(kinds):
        out.append(_finding(title, claim, [
            _part("held-in, it − plain (mean over methods and N)",
                  arrays.over_methods("it", "held_in_norm") - arrays.over_methods("plain", "held_in_norm")),
            _part("held-out, it − plain (mean over methods and N)",
                  arrays.over_methods("it", "held_out_norm") - arrays.over_methods("plain", "held_out_norm")),
        ]))
    else:
        out.append(_finding(title, claim, [], absent="this zoo has one base kind"))
    parts = []
    for larger in zoos[1:]:
        for kind in kinds:
            big = f"{kind}@{larger['name']}"
            if big not in arrays.cells:
                continue
            common = [n for n in arrays.sizes(kind) if n in arrays.sizes(big)]  # a run cut short has fewer N

            def over(k: str, metric: str) -> np.ndarray:
                return mean_of(arrays.over_methods(k, metric, n) for n in common)

            label = (f"{KIND_LABELS.get(kind, kind)}, {larger['name']} ({larger['parameters'] / 1e6:.2f}M) − "
                     f"{zoos[0]['name']} ({zoos[0]['parameters'] / 1e6:.2f}M)")
            parts += [_part(f"{label}, {name} (mean over methods and N={','.join(map(str, common))})",
                            over(big, metric) - over(kind, metric))
                      for name, metric in (("held-in", "held_in_norm"), ("held-out", "held_out_norm"))]
    out.append(_finding("2. Larger models merge better?", "merges of larger models score higher", parts,
                        absent=None if parts else "one model size (`study=two_sizes` runs a second)"))
    parts = []
    for kind in kinds:
        sizes = arrays.sizes(kind)
        if len(sizes) < 2:
            continue
        hi = sizes[-1]
        label = KIND_LABELS.get(kind, kind)
        held_out = {n: arrays.over_methods(kind, "held_out_norm", n) for n in sizes}
        parts += [
            _part(f"{label}: experts − merges held-in at N={hi}", 1 - arrays.over_methods(kind, "held_in_norm", hi)),
            _part(f"{label}: held-out slope per added expert (N={sizes[0]}..{hi})", slope(sizes, held_out.values())),
            _part(f"{label}: held-out merges at N={hi} − a single expert",
                  held_out[hi] - arrays.expert_held_out(kind, info["held_out"])),
        ]
    out.append(_finding("3. Held-in vs held-out as N grows",
                        "merges trail the experts held-in but generalize better held-out than a single expert, more "
                        "so with more experts", parts) if parts else
               _finding("3. Held-in vs held-out as N grows", "", [], absent="fewer than two N"))
    spreads = {}
    for kind in kinds:
        top = arrays.sizes(kind)[-1]
        values = [by_n[top]["held_in_norm"] for m, by_n in arrays.cells[kind].items() if m != EVOLVED and top in by_n]
        if len(values) > 1:
            stacked = np.stack(values)
            spreads[kind] = (top, np.max(stacked, axis=0) - np.min(stacked, axis=0))
    title = "4. Methods similar at scale?"
    claim = "the methods' held-in spread is smaller on the instruction-tuned base"
    if {"plain", "it"} <= set(spreads):
        out.append(_finding(title, claim, [_part(
            f"held-in spread (max − min over methods) at N={spreads['plain'][0]}, plain − it",
            spreads["plain"][1] - spreads["it"][1])]))
    else:
        out.append(_finding(title, claim, [], absent="needs both base kinds and two methods"))
    parts = []
    for kind in kinds:
        sizes = [n for n in arrays.sizes(kind) if n in arrays.cells[kind].get(EVOLVED, {})]
        if len(sizes) < 2:
            continue
        def margin(n: int) -> np.ndarray:
            best = np.max(np.stack([arrays.cells[kind][m][n]["held_in_norm"] for m in arrays.uniform(kind)
                                    if n in arrays.cells[kind][m]]), axis=0)
            return arrays.cells[kind][EVOLVED][n]["held_in_norm"] - best
        label, hi = KIND_LABELS.get(kind, kind), sizes[-1]
        parts += [_part(f"{label}: evolved − best uniform method held-in at N={hi}", margin(hi)),
                  _part(f"{label}: that margin's slope per added expert (N={sizes[0]}..{hi})",
                        slope(sizes, [margin(n) for n in sizes]))]
    out.append(_finding("5. Does evolution's margin grow with N?", "a CMA-ES search over per-expert weights beats "
                        "the best uniform method, by more with more experts", parts) if parts else
               _finding("5. Does evolution's margin grow with N?", "", [], absent="no evolved merges at two N"))
    return out


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(estimate: Mapping[str, float | None]) -> str:
    if estimate["value"] is None:
        return "n/a"
    return f"{_f(estimate['value'])} [{_f(estimate['low'], 2)}, {_f(estimate['high'], 2)}]"


def markdown(summary: Mapping[str, Any]) -> str:
    sizes = sorted({int(n) for kind in summary["cells"].values() for m in kind.values() for n in m})
    header = "| base | method | " + " | ".join(f"N={n} held-in / held-out" for n in sizes) + " |"
    lines = [header, "|" + " --- |" * (2 + len(sizes))]
    for kind, methods in summary["cells"].items():
        for method, by_n in methods.items():
            cells = []
            for n in sizes:
                c = by_n.get(str(n))
                cells.append("" if c is None else f"{_ci(c['held_in_norm'])} / {_ci(c['held_out_norm'])}")
            lines.append(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    refs = [f"{kind}: base held-in {_ci(ref['base_held_in_norm'])}, single expert held-out "
            f"{_ci(ref['expert_held_out_norm'])}" for kind, ref in summary["references"].items()]
    counts = {n: len(s) for n, s in summary["subsets"].items()}
    lines.append("")
    lines.append(
        "Each cell: the mean over expert subsets (" + ", ".join(f"N={n}: {c}" for n, c in counts.items())
        + ") with its bootstrap 95% interval over subsets and test questions (" + f"{summary['replicates']} "
        "replicates); held-in = merged score / the task's own expert's score, held-out = merged score / that base "
        f"kind's base score (test split; held-out tasks: {', '.join(summary['held_out'])}). References (same "
        "normalization): " + "; ".join(refs) + ". Model sizes: "
        + "; ".join(f"{zoo['name']} {zoo['parameters'] / 1e6:.2f}M parameters ({', '.join(zoo['kinds'])})"
                    for zoo in summary["zoos"]) + ".")
    return "\n".join(lines)


def experts_markdown(summary: Mapping[str, Any]) -> str:
    """The raw test scores the normalization divides by: each kind's base and each expert on its own task."""
    tasks = [*summary["held_in"], *summary["held_out"], *summary["held_out_left_out"]]
    lines = ["| model | " + " | ".join(tasks) + " |", "|" + " --- |" * (1 + len(tasks))]
    for kind, ref in summary["references"].items():
        lines.append(f"| {kind} base | " + " | ".join(f"{ref['base_scores'][t]:.2f}" for t in tasks) + " |")
        lines.append(f"| {kind} expert (own task) | " + " | ".join(
            f"{ref['expert_own_scores'][t]:.2f}" if t in ref["expert_own_scores"] else "–" for t in tasks) + " |")
    gate = summary.get("gate")
    if gate:
        failed = ", ".join(f"{name} {score:.2f}" for name, score in gate["failed"].items())
        lines.append("")
        lines.append(f"Expert gate (each held-in expert ≥ {gate['threshold']} on its own test task): "
                     + ("passed by every expert." if not failed else f"FAILED by {failed}."))
    if summary["held_out_left_out"]:
        few = "; ".join(f"{task} (" + ", ".join(f"{kind} {right} of {total}" for kind, (right, total) in by_kind.items())
                        + ")" for task, by_kind in summary["held_out_left_out"].items())
        lines.append("")
        lines.append(f"Left out of every held-out mean, for all base kinds and sizes (a base answers fewer than "
                     f"{summary['held_out_min_right']} of its questions: a normalizer of a handful of answers): {few}.")
    return "\n".join(lines)


def findings_markdown(summary: Mapping[str, Any]) -> list[str]:
    paragraphs = []
    for finding in summary["findings"]:
        if finding["verdict"] == "not measured":
            paragraphs.append(f"**{finding['title']}** Not measured: {finding['why']}.")
            continue
        parts = "; ".join(f"{p['label']}: {_ci(p)} ({p['verdict']})" for p in finding["parts"])
        paragraphs.append(f"**{finding['title']}** Claim: {finding['claim']}. Differences the claim says are "
                          f"positive, with 95% intervals: {parts}. The miniature **{finding['verdict']}**.")
    return paragraphs


def plot(summary: Mapping[str, Any], out: Path) -> list[Path]:
    """study_methods.png: held-in and held-out normalized scores against N with their intervals, a line per method,
    a column per base kind (the paper's Figures 2-3); study_base_kinds.png: a line per base kind, mean over the
    uniform methods, with its interval."""
    kinds = list(summary["cells"])
    paths = []
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6.4), dpi=120, squeeze=False, sharey="row")
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for method, by_n in summary["cells"][kind].items():
                ns = sorted(int(n) for n in by_n if by_n[n][metric]["value"] is not None)
                values = [by_n[str(n)][metric] for n in ns]
                ax.errorbar(ns, [v["value"] for v in values],
                            yerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]],
                            marker="o", capsize=3, label=method)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1,
                       label="expert" if metric == "held_in_norm" else "base")
            ax.set_title(f"{KIND_LABELS.get(kind, kind)}: {'held-in' if row == 0 else 'held-out'}", fontsize=9)
            ax.set_xlabel("experts merged (N)")
            ax.set_ylabel("normalized score (95% interval)")
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
            by_n = {int(n): v for n, v in summary["over_methods"][kind][metric].items() if v["value"] is not None}
            values = list(by_n.values())
            ax.errorbar(list(by_n), [v["value"] for v in values], marker="o", capsize=3,
                        label=KIND_LABELS.get(kind, kind), yerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]])
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
        *findings_markdown(summary),
    ]) + "\n"
