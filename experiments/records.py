"""Metrics as JSON-ready dicts for the results files, and their aggregation back."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

METRICS = ("es", "ps", "ns", "s", "em", "pm", "nm")


def aggregate_dict(agg) -> dict:
    d = {k: _num(getattr(agg, k)) for k in METRICS}
    d["n_cases"] = int(agg.n_cases)
    return d


def case_dicts(cases) -> list[dict]:
    return [{"case_id": c.case_id, **{k: _num(getattr(c, k)) for k in ("es", "ps", "ns", "em", "pm", "nm")}}
            for c in cases]


def aggregate_cases(case_rows: Sequence[Mapping]) -> dict:
    """Aggregate of per-case dicts (the same means and S as jaxedit.eval.metrics.aggregate)."""
    from jaxedit.eval import metrics

    cases = [metrics.CaseMetrics(case_id=c["case_id"], **{k: _nan(c[k]) for k in ("es", "ps", "ns", "em", "pm", "nm")})
             for c in case_rows]
    return aggregate_dict(metrics.aggregate(cases))


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _nan(x):
    return float("nan") if x is None else float(x)
