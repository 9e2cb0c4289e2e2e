"""Paired comparisons that the sweeps' findings rest on, from their raw records.

Each comparison is a difference of aggregates on the same cases (matched by case_id), with a paired
bootstrap 95% interval (jaxedit.eval.intervals.paired_difference, S recomputed in every resample):
edited vs the same cases unedited, one layer vs another, batch size B vs a smaller one on the cases
they share (nested batches), EMMET vs MEMIT, sequential batches vs one batch. A difference whose
interval excludes 0 is reported as higher or lower; otherwise "cannot tell" at this size.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from jaxedit.eval import intervals

SHOWN = ("es", "ps", "ns", "s")


def verdict(interval) -> str:
    if interval.low > 0:
        return "higher"
    if interval.high < 0:
        return "lower"
    return "cannot tell"


def compare(label: str, after: Sequence[Mapping], before: Sequence[Mapping], n_resamples: int = 1000) -> list | None:
    """One table row: label, shared cases, each metric's difference [interval], and S's verdict."""
    if not after or not before:  # records without per-case rows
        return None
    a, b = intervals.paired_cases(after, before)
    if len(a) < 2:
        return None
    diff = intervals.paired_difference(a, b, n_resamples=n_resamples, seed=0)
    return [label, len(a), *[f"{diff[m].estimate:+.1f} [{diff[m].low:+.1f}, {diff[m].high:+.1f}]" for m in SHOWN],
            verdict(diff["ns"]), verdict(diff["s"])]


HEADER = ["comparison (A − B)", "shared cases", "ΔES", "ΔPS", "ΔNS", "ΔS", "NS of A", "S of A"]


def layer_rows(cells: Sequence[Mapping], label) -> list[list]:
    """Per method: its best layer (by S), the preset layer 3, the middle and the last layer against
    unedited, and the best layer against the middle and the last one (fixed layers, not chosen after
    seeing the results, besides the best); ROME against MEMIT at each one's best layer and the middle."""
    rows = []
    by, chosen = {}, {}
    for c in cells:
        by.setdefault(label(c["key"]), {})[c["key"]["layer"]] = c
    for method, mine in by.items():
        best = max(mine, key=lambda l: mine[l]["aggregate"]["s"] or 0.0)
        first, last = min(mine), max(mine)
        middle = min(mine, key=lambda l: abs(l - (first + last + 1) // 2))
        chosen[method] = (best, middle)
        for layer in dict.fromkeys((best, 3, middle, last)):
            if layer in mine and mine[layer].get("before_cases"):
                rows.append(compare(f"{method} layer {layer} − unedited", mine[layer].get("cases"),
                                    mine[layer]["before_cases"]))
        for other in dict.fromkeys((middle, last)):
            if other != best:
                rows.append(compare(f"{method} layer {best} (best S) − layer {other}", mine[best].get("cases"),
                                    mine[other].get("cases")))
        if first not in (best, last):
            rows.append(compare(f"{method} layer {first} − layer {last}", mine[first].get("cases"), mine[last].get("cases")))
    if "ROME" in by and "MEMIT" in by:  # the two single-edit solves on the same cases and layer
        for layer in dict.fromkeys((*chosen["MEMIT"], *chosen["ROME"])):
            if layer in by["ROME"] and layer in by["MEMIT"]:
                rows.append(compare(f"ROME − MEMIT at layer {layer}", by["ROME"][layer].get("cases"),
                                    by["MEMIT"][layer].get("cases")))
    return [r for r in rows if r]


def batch_rows(cells: Sequence[Mapping], label) -> list[list]:
    """Per method: each batch size against the next smaller one on the cases they share, and against
    the same cases unedited; per batch size, EMMET against MEMIT."""
    rows = []
    by = {}
    for c in cells:
        by.setdefault(label(c["key"]), {})[c["key"]["batch_size"]] = c
    for method, sizes in by.items():
        order = sorted(sizes)
        for b in order:
            if sizes[b].get("before_cases"):
                rows.append(compare(f"{method} B={b} − unedited", sizes[b].get("cases"), sizes[b]["before_cases"]))
        for small, big in zip(order, order[1:]):
            rows.append(compare(f"{method} B={big} − B={small} (the B={small} cases)", sizes[big].get("cases"),
                                sizes[small].get("cases")))
    if "EMMET" in by and "MEMIT" in by:
        for b in sorted(set(by["EMMET"]) & set(by["MEMIT"])):
            rows.append(compare(f"EMMET − MEMIT at B={b}", by["EMMET"][b].get("cases"), by["MEMIT"][b].get("cases")))
    return [r for r in rows if r]


def sequential_rows(cells: Sequence[Mapping], label) -> list[list]:
    """Per method: after all edits, each batch size against one batch of all edits (the largest batch
    size run) and against the same cases unedited."""
    rows = []
    by = {}
    for c in cells:
        by.setdefault(label(c["key"]), {})[c["key"]["batch_size"]] = c
    for method, sizes in by.items():
        largest = max(sizes)
        for b in sorted(sizes):
            c = sizes[b]
            if c.get("before_cases"):
                rows.append(compare(f"{method} batches of {b}, all edits − unedited", c.get("final_cases"), c["before_cases"]))
            if b != largest:
                rows.append(compare(f"{method} batches of {b} − batches of {largest}", c.get("final_cases"),
                                    sizes[largest].get("final_cases")))
    return [r for r in rows if r]
