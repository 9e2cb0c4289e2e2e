"""Plain-text tables of aggregated metrics."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from jaxedit.eval.metrics import Aggregate


_COLUMNS = ("es", "ps", "ns", "s", "em", "pm", "nm", "ge")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def format_table(rows: Mapping[str, Aggregate], columns: Sequence[str] = _COLUMNS) -> str:
    """A plain-text table, one row per named Aggregate (e.g. {"before": ..., "after": ...})."""
    columns = [c for c in columns if c != "ge" or any(a.ge is not None for a in rows.values())]
    name_w = max([4] + [len(n) for n in rows])
    head = f"{'':<{name_w}}  {'n':>5}  " + "  ".join(f"{c.upper():>6}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, a in rows.items():
        lines.append(f"{name:<{name_w}}  {a.n_cases:>5}  " + "  ".join(f"{_fmt(getattr(a, c)):>6}" for c in columns))
    return "\n".join(lines)


def format_before_after(before: Aggregate, after: Aggregate) -> str:
    """Before / after / change table of two aggregates."""
    delta = Aggregate(n_cases=after.n_cases, **{
        c: (None if getattr(before, c) is None or getattr(after, c) is None
            else getattr(after, c) - getattr(before, c)) for c in _COLUMNS})
    return format_table({"before": before, "after": after, "change": delta})
