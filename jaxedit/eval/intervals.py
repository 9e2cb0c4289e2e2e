"""Bootstrap confidence intervals over cases for the CounterFact metrics, and paired intervals for the
differences a finding rests on (edited vs the same cases unedited, one setting vs another on the
same cases).

Every resample draws the cases with replacement and recomputes the aggregate exactly as
jaxedit.eval.metrics.aggregate does: ES, PS, NS and the margins as means over the drawn cases, and S
as the harmonic mean of those ES, PS and NS (never a mean of per-case S). Intervals are percentile
intervals; everything is seeded.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

METRICS = ("es", "ps", "ns", "em", "pm", "nm")
WITH_S = METRICS[:3] + ("s",) + METRICS[3:]


@dataclasses.dataclass(frozen=True)
class Interval:
    """An aggregate (`estimate`, on all cases) and its bootstrap interval [low, high] at `level`."""

    estimate: float
    low: float
    high: float
    level: float

    def __str__(self) -> str:
        return f"{self.estimate:.1f} [{self.low:.1f}, {self.high:.1f}]"


def case_matrix(cases) -> np.ndarray:
    """(n, 6) float64 per-case ES, PS, NS, EM, PM, NM from CaseMetrics or dicts (None -> nan)."""
    rows = []
    for c in cases:
        get = c.get if isinstance(c, Mapping) else lambda k, c=c: getattr(c, k)
        rows.append([np.nan if get(k) is None else float(get(k)) for k in METRICS])
    if not rows:
        raise ValueError("no cases to bootstrap")
    return np.asarray(rows, np.float64)


def _aggregates(values: np.ndarray) -> np.ndarray:
    """(..., n, 6) per-case values -> (..., 7) means of ES, PS, NS, S, EM, PM, NM (S = harmonic mean)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.nanmean(values, axis=-2)
        es, ps, ns = means[..., 0], means[..., 1], means[..., 2]
        positive = (es > 0) & (ps > 0) & (ns > 0)
        s = np.where(positive, 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns), 0.0)
        s = np.where(np.isnan(es) | np.isnan(ps) | np.isnan(ns), np.nan, s)
    return np.concatenate([means[..., :3], s[..., None], means[..., 3:]], axis=-1)


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(draws, [alpha, 1.0 - alpha]) if np.any(~np.isnan(draws)) else (np.nan, np.nan)
    return Interval(float(estimate), float(low), float(high), level)


def bootstrap(cases, *, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Intervals for ES, PS, NS, S, EM, PM, NM of a set of cases.

    Args:
      cases: CaseMetrics (jaxedit.eval.metrics) or dicts with their fields.
    Returns:
      {metric: Interval}.
    """
    values = case_matrix(cases)
    draws = _aggregates(values[_resample_indices(len(values), n_resamples, seed)])
    estimate = _aggregates(values)
    return {m: _interval(estimate[j], draws[:, j], level) for j, m in enumerate(WITH_S)}


def paired_difference(after, before, *, n_resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict[str, Interval]:
    """Intervals for aggregate(after) - aggregate(before) on the same cases, drawn together.

    Args:
      after, before: per-case metrics of the same cases in the same order (e.g. edited and unedited,
        or batch 64 and batch 16 on nested cases restricted to the common ones).
    Returns:
      {metric: Interval of the difference}; identical inputs give [0, 0].
    """
    a, b = case_matrix(after), case_matrix(before)
    if a.shape != b.shape:
        raise ValueError(f"paired cases must be the same cases: {len(a)} after vs {len(b)} before")
    idx = _resample_indices(len(a), n_resamples, seed)
    draws = _aggregates(a[idx]) - _aggregates(b[idx])
    estimate = _aggregates(a) - _aggregates(b)
    return {m: _interval(estimate[j], draws[:, j], level) for j, m in enumerate(WITH_S)}


def paired_cases(after: Sequence, before: Sequence) -> tuple[list, list]:
    """The cases two runs share, by case_id, in one order (for paired_difference)."""
    def key(c):
        return c["case_id"] if isinstance(c, Mapping) else c.case_id

    mine = {key(c): c for c in before}
    common = [c for c in after if key(c) in mine]
    return common, [mine[key(c)] for c in common]
