"""A model of how much a batch edit degrades, from what its solve says (experiments.solve_diagnostics
records), fitted on some batch sizes and checked on batch sizes it never saw.

Each finished cell (one batch) gives a row: its batch size, method and layer; its losses, in points
on the batch's own cases,

  ns_loss = NS unedited − NS edited (paired on the same cases)
  ps_loss = 100 − PS edited,  es_loss = 100 − ES edited   (what the edit fails to write)

and its solve's diagnostics as predictors (PREDICTORS). The model is a straight line loss = a + b x
on one predictor x, pooled over methods and layers, fitted by least squares on the fit split only
(every row whose batch size is not held out). The predictor is the one with the largest |Spearman
rank correlation| with the loss on the fit split. Intervals: the fit rows are resampled with
replacement (seeded) and everything is recomputed, the correlation and the line; a prediction's
interval adds a residual of the refitted line drawn from its own fit rows. The held-out rows are
read only to be predicted and compared: reordering or changing them cannot change the fitted model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

TARGETS = ("ns_loss", "ps_loss", "es_loss")


def _log10(x) -> float:
    return math.log10(x) if x is not None and x > 0 else float("nan")


PREDICTORS: dict[str, Callable[[Mapping], float]] = {
    "log10 preservation cost": lambda r: _log10(r["diagnostics"]["preservation_cost"]),
    "own-key residual": lambda r: r["diagnostics"]["residual"],
    "log10 smallest eigenvalue / mean key norm": lambda r: _log10(
        max(r["diagnostics"]["gram_min_eigenvalue"], 1e-12 * r["diagnostics"]["key_norm"]) / r["diagnostics"]["key_norm"]),
    "effective rank / B": lambda r: r["diagnostics"]["effective_rank"] / r["diagnostics"]["n_keys"],
    "coherence": lambda r: r["diagnostics"]["coherence"],
    "mean coherence": lambda r: r["diagnostics"]["mean_coherence"],
    "log10 ||dW||_F": lambda r: _log10(r["diagnostics"]["delta_norm"]),
    "top-1% share of dW": lambda r: r["diagnostics"]["top_share"].get("0.01", float("nan")),
}
BASELINES: dict[str, Callable[[Mapping], float]] = {
    "log2 B": lambda r: math.log2(r["key"]["batch_size"]),
    "B / d_ff": lambda r: r["key"]["batch_size"] / r["d_ff"],
}


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def rows_from_cells(cells: Sequence[Mapping]) -> list[dict]:
    """One row per solve_diagnostics cell record: key fields, losses, every predictor and baseline."""
    rows = []
    for c in cells:
        k = c["key"]
        after, before = c["aggregate"], c["before"]
        row = {"method": k["method"], "layer": k["layer"], "batch_size": k["batch_size"],
               "batch_index": k.get("batch_index", 0),
               "ns_loss": _num(before["ns"]) - _num(after["ns"]), "ps_loss": 100.0 - _num(after["ps"]),
               "es_loss": 100.0 - _num(after["es"])}
        for name, fn in {**PREDICTORS, **BASELINES}.items():
            row[name] = float(fn(c))
        rows.append(row)
    return rows


def split(rows: Sequence[Mapping], held_out_sizes: Sequence[int]) -> tuple[list, list]:
    """(fit rows, held-out rows), each in the given order."""
    held = set(int(b) for b in held_out_sizes)
    return [r for r in rows if r["batch_size"] not in held], [r for r in rows if r["batch_size"] in held]


def _xy(rows, predictor, target):
    x = np.asarray([r[predictor] for r in rows], np.float64)
    y = np.asarray([r[target] for r in rows], np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b ((R, n) -> (R,); nan where one is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt(np.sum(a * a, axis=-1) * np.sum(b * b, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(a * b, axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row (average ranks for ties)."""
    from scipy.stats import rankdata

    return _pearson_rows(rankdata(x, axis=-1), rankdata(y, axis=-1))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return float("nan")
    return float(_spearman_rows(np.asarray(x, np.float64)[None], np.asarray(y, np.float64)[None])[0])


def _lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (intercepts, slopes) per row of (R, n) x and y; a constant x gives slope 0."""
    xm, ym = x.mean(axis=-1, keepdims=True), y.mean(axis=-1, keepdims=True)
    sxx = np.sum((x - xm) ** 2, axis=-1)
    sxy = np.sum((x - xm) * (y - ym), axis=-1)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    return ym[..., 0] - slope * xm[..., 0], slope


def _line(x, y) -> tuple[float, float]:
    a, b = _lines(np.asarray(x, np.float64)[None], np.asarray(y, np.float64)[None])
    return float(a[0]), float(b[0])


@dataclasses.dataclass(frozen=True)
class LineFit:
    """loss = intercept + slope * predictor on the fit split, with its bootstrap draws."""

    target: str
    predictor: str
    intercept: float
    slope: float
    rho: float                      # Spearman rank correlation on the fit rows
    rho_interval: tuple[float, float]
    boot: np.ndarray                # (resamples, 2): intercept, slope of each resample
    boot_residuals: np.ndarray      # (resamples, fit rows): each refitted line's residuals on its rows
    fit_sizes: tuple[int, ...]
    n_fit: int

    def predict(self, x: float, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
        """(estimate, low, high) of the loss at predictor value x: the bootstrap lines' predictions
        plus one of each line's own residuals, at `level`."""
        rng = np.random.default_rng(seed)
        draws = self.boot[:, 0] + self.boot[:, 1] * x
        res = self.boot_residuals
        noise = res[np.arange(len(res)), rng.integers(0, res.shape[1], len(res))]
        alpha = (1 - level) / 2
        low, high = np.quantile(draws + noise, [alpha, 1 - alpha])
        return self.intercept + self.slope * x, float(low), float(high)

    def onset(self, loss: float) -> float:
        """The predictor value at which the fitted line reaches `loss` (nan for a flat line)."""
        return (loss - self.intercept) / self.slope if self.slope else float("nan")


def fit_line(rows: Sequence[Mapping], target: str, predictor: str, held_out_sizes: Sequence[int], *,
             n_resamples: int = 1000, seed: int = 0) -> LineFit:
    """The line of `target` on `predictor` fitted on the fit split only (see the module docstring)."""
    fit_rows, _ = split(rows, held_out_sizes)
    x, y = _xy(fit_rows, predictor, target)
    if len(x) < 3:
        raise ValueError(f"{len(x)} fit rows with finite {predictor!r} and {target!r}: at least 3 are needed "
                         f"(held out: batch sizes {sorted(held_out_sizes)})")
    intercept, slope = _line(x, y)
    idx = np.random.default_rng(seed).integers(0, len(x), (n_resamples, len(x)))  # resamples of the fit rows
    xb, yb = x[idx], y[idx]
    a, b = _lines(xb, yb)
    residuals = yb - (a[:, None] + b[:, None] * xb)
    rhos = _spearman_rows(xb, yb)
    lo, hi = (np.nanquantile(rhos, [0.025, 0.975]) if np.any(np.isfinite(rhos)) else (np.nan, np.nan))
    return LineFit(target=target, predictor=predictor, intercept=intercept, slope=slope, rho=spearman(x, y),
                   rho_interval=(float(lo), float(hi)), boot=np.stack([a, b], axis=1), boot_residuals=residuals,
                   fit_sizes=tuple(sorted({r["batch_size"] for r in fit_rows})), n_fit=len(x))


def choose_predictor(rows: Sequence[Mapping], target: str, held_out_sizes: Sequence[int],
                     candidates: Sequence[str] = tuple(PREDICTORS)) -> tuple[str, dict[str, float]]:
    """(the candidate with the largest |Spearman rho| with `target` on the fit split, {candidate: rho})."""
    fit_rows, _ = split(rows, held_out_sizes)
    rhos = {c: spearman(*_xy(fit_rows, c, target)) for c in candidates}
    finite = {c: r for c, r in rhos.items() if math.isfinite(r)}
    if not finite:
        raise ValueError(f"no candidate predictor correlates with {target!r} on the fit split")
    return max(finite, key=lambda c: abs(finite[c])), rhos


@dataclasses.dataclass(frozen=True)
class HeldOutCheck:
    """A fitted model's predictions for the held-out rows, beside what was measured."""

    fit: LineFit
    rows: tuple            # (row, estimate, low, high) per held-out row
    rmse: float            # of the estimates against the measured losses
    covered: float         # share of held-out losses inside their prediction interval


def check_held_out(fit: LineFit, rows: Sequence[Mapping], held_out_sizes: Sequence[int]) -> HeldOutCheck:
    _, held = split(rows, held_out_sizes)
    out, errors, inside = [], [], []
    for r in held:
        x, y = r[fit.predictor], r[fit.target]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        est, lo, hi = fit.predict(x)
        out.append((r, est, lo, hi))
        errors.append(est - y)
        inside.append(lo <= y <= hi)
    rmse = float(np.sqrt(np.mean(np.square(errors)))) if errors else float("nan")
    return HeldOutCheck(fit=fit, rows=tuple(out), rmse=rmse, covered=float(np.mean(inside)) if inside else float("nan"))


def degradation_models(rows: Sequence[Mapping], held_out_sizes: Sequence[int], *, baseline: str = "log2 B",
                       n_resamples: int = 1000) -> dict[str, dict[str, HeldOutCheck]]:
    """Per target: the chosen diagnostic's line and the baseline's line, each checked on the held-out rows."""
    out = {}
    for target in TARGETS:
        chosen, _ = choose_predictor(rows, target, held_out_sizes)
        out[target] = {name: check_held_out(fit_line(rows, target, name, held_out_sizes, n_resamples=n_resamples),
                                            rows, held_out_sizes)
                       for name in (chosen, baseline)}
    return out
