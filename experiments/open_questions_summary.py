"""Tables and one plot per open question, from the JSONL records of experiments.layer_window_sweep,
experiments.solve_diagnostics and experiments.neighbour_kl:

  layer_windows.{md,png}      how many layers to spread an edit over: every window against the
                              one-layer edit at its start, on the same cases (paired intervals)
  batch_degradation.{md,png}  the solve's diagnostics per batch; their rank correlations with the
                              NS, PS and ES loss; a line fitted on the fit split of batch sizes and
                              checked on the held-out sizes (experiments.degradation_model)
  late_layers.{md,png}        the neighbour's KL per edit layer (trough vs late layers), and the
                              paraphrase key against the batch keys' span (small vs large batch)

A verdict "holds" when its 95% interval excludes 0 in the hypothesis' direction, "does not hold" when
it excludes 0 the other way, "cannot tell at this size" otherwise. Only complete cells count
(experiments.results_log.latest_complete).

  python -m experiments.open_questions_summary --windows_file=runs/layer_window_sweep.jsonl \\
      --diagnostics_file=runs/solve_diagnostics.jsonl --neighbour_kl_file=runs/neighbour_kl.jsonl \\
      --questions_out_dir=experiments/results/open_questions
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags

from experiments import degradation_model as dm
from experiments import results_log
from jaxedit.eval import intervals

# Flag names of their own: summary modules are imported side by side (tests), and absl refuses a
# flag defined twice.
flags.DEFINE_string("windows_file", None, "experiments.layer_window_sweep JSONL")
flags.DEFINE_string("diagnostics_file", None, "experiments.solve_diagnostics JSONL")
flags.DEFINE_string("neighbour_kl_file", None, "experiments.neighbour_kl JSONL")
flags.DEFINE_string("questions_out_dir", "experiments/results/open_questions", "where the .md and .png files go")
flags.DEFINE_string("held_out_batch_sizes", "512,2048", "batch sizes the degradation model never sees")
flags.DEFINE_float("onset_loss", 2.0, "the loss (points) at which degradation is said to start")
flags.DEFINE_string("trough_layers", "", "layers where NS is lowest, e.g. 17-21 (default: the 5 consecutive "
                    "layers of the largest NS loss in the neighbour KL records)")
flags.DEFINE_string("late_layers", "", "late layers where NS recovers, e.g. 24-28 (default: every layer after "
                    "the trough but the last)")
flags.DEFINE_string("ps_batch_sizes", "16,64", "the small and the large batch of the paraphrase question")
flags.DEFINE_integer("questions_resamples", 1000, "bootstrap resamples for every interval")
FLAGS = flags.FLAGS

TITLE = {"memit": "MEMIT", "emmet": "EMMET", "rome": "ROME"}


# ------------------------------------------------------------------------------------ helpers
def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _f(x, digits=1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _g(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _ci(est, low, high, digits=1, sign=False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (est, low, high)):
        return "–"
    return f"{fmt.format(est)} [{fmt.format(low)}, {fmt.format(high)}]"


def verdict(low: float, high: float, expect_negative: bool = False) -> str:
    """'holds' / 'does not hold' / 'cannot tell at this size' for an interval and the expected sign."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "cannot tell at this size"
    below, above = high < 0, low > 0
    if (below and expect_negative) or (above and not expect_negative):
        return "holds"
    if below or above:
        return "does not hold"
    return "cannot tell at this size"


def bootstrap_statistic(stat, n: int, n_resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """(stat(all), 2.5%, 97.5%) of stat(indices) over case resamples drawn with replacement."""
    rng = np.random.default_rng(seed)
    est = stat(np.arange(n))
    draws = np.asarray([stat(rng.integers(0, n, n)) for _ in range(n_resamples)], np.float64)
    low, high = np.nanquantile(draws, [0.025, 0.975]) if np.any(np.isfinite(draws)) else (np.nan, np.nan)
    return float(est), float(low), float(high)


def two_sample_bootstrap(x: np.ndarray, y: np.ndarray, n_resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean x − mean y, 2.5%, 97.5%), x and y resampled independently (two different sets of cases)."""
    rng = np.random.default_rng(seed)
    draws = [x[rng.integers(0, len(x), len(x))].mean() - y[rng.integers(0, len(y), len(y))].mean()
             for _ in range(n_resamples)]
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(x.mean() - y.mean()), float(low), float(high)


def parse_layers(text: str) -> list[int]:
    """'17-21' or '17,18,19' (or a mix) -> layer list."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cells(path, sweep: str) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    cells, _ = results_log.latest_complete(results_log.read_jsonl(path))
    return [c for c in cells.values() if c["key"].get("sweep") == sweep]


def _paired(after, before, n_resamples, metrics=("es", "ps", "ns", "s", "em")):
    a, b = intervals.paired_cases(after or [], before or [])
    if len(a) < 2:
        return None, 0
    d = intervals.paired_difference(a, b, n_resamples=n_resamples, seed=0)
    return {m: d[m] for m in metrics}, len(a)


# ================================================================================ layer windows
def layer_windows(cells: Sequence[Mapping], out_dir: Path, n_resamples: int) -> str:
    if not cells:
        return ""
    cells = sorted(cells, key=lambda c: (c["key"]["method"], c["key"]["batch_size"], c["key"]["start"],
                                         c["key"]["window"]))
    by = {(c["key"]["method"], c["key"]["batch_size"], c["key"]["start"], c["key"]["window"]): c for c in cells}
    rows, paired_rows, best = [], [], []
    for c in cells:
        k, a = c["key"], c["aggregate"]
        ci = intervals.bootstrap(c["cases"], n_resamples=n_resamples, seed=0) if c.get("cases") else None
        shown = [(_ci(ci[m].estimate, ci[m].low, ci[m].high) if ci else _f(a.get(m))) for m in ("es", "ps", "ns", "s", "em")]
        norms = " / ".join(_f(v) for v in c.get("delta_norms", {}).values())
        rows.append([TITLE.get(k["method"], k["method"]), k["batch_size"], k["start"], k["window"],
                     f"{k['start']}-{k['start'] + k['window'] - 1}", *shown, norms])
        one = by.get((k["method"], k["batch_size"], k["start"], 1))
        if k["window"] > 1 and one is not None:
            d, n = _paired(c.get("cases"), one.get("cases"), n_resamples)
            if d:
                paired_rows.append([f"{TITLE.get(k['method'], k['method'])} B={k['batch_size']}: layers {k['start']}-"
                                    f"{k['start'] + k['window'] - 1} − layer {k['start']}", n,
                                    *[_ci(d[m].estimate, d[m].low, d[m].high, sign=True) for m in ("es", "ps", "ns", "s", "em")],
                                    verdict(d["s"].low, d["s"].high).replace("holds", "better").replace(
                                        "does not hold", "worse")])
    for method in sorted({k[0] for k in by}):
        for b in sorted({k[1] for k in by if k[0] == method}):
            mine = [c for key, c in by.items() if key[0] == method and key[1] == b]
            top = max(mine, key=lambda c: c["aggregate"].get("s") or 0.0)
            k = top["key"]
            one = by.get((method, b, k["start"], 1))
            d, _ = _paired(top.get("cases"), one.get("cases"), n_resamples) if one is not None else (None, 0)
            gain = (f"; against layer {k['start']} alone, ΔS {_ci(d['s'].estimate, d['s'].low, d['s'].high, sign=True)}"
                    if d and k["window"] > 1 else "")
            best.append(f"- {TITLE.get(method, method)}, B={b}: best S {_f(top['aggregate'].get('s'))} with "
                        f"{k['window']} layer(s) from layer {k['start']}{gain}")
    text = ("## How many layers? One batch spread over a window of consecutive layers\n\n"
            "Each metric over the batch's cases [bootstrap 95% interval]; `|dW| per layer`: the update's "
            "Frobenius norm at each layer of the window, first to last.\n\n"
            + md_table(["method", "B", "start", "window", "layers", "ES", "PS", "NS", "S", "EM (margin)", "|dW| per layer"],
                       rows) + "\n\n" + "\n".join(best) + "\n")
    if paired_rows:
        text += ("\n### Each window against the one-layer edit at its start (same cases; paired 95% interval)\n\n"
                 + md_table(["comparison (A − B)", "cases", "ΔES", "ΔPS", "ΔNS", "ΔS", "ΔEM", "S"], paired_rows) + "\n")
    (out_dir / "layer_windows.md").write_text(text)

    plt = _plt()
    methods = sorted({k[0] for k in by})
    sizes = sorted({k[1] for k in by})
    fig, axes = plt.subplots(len(methods), len(sizes), figsize=(4.5 * len(sizes), 3.4 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, b in enumerate(sizes):
            ax = axes[i][j]
            for start in sorted({k[2] for k in by if k[0] == method and k[1] == b}):
                mine = sorted((c for key, c in by.items() if key[:3] == (method, b, start)), key=lambda c: c["key"]["window"])
                xs = [c["key"]["window"] for c in mine]
                ys = [c["aggregate"].get("s") or float("nan") for c in mine]
                if all(c.get("cases") for c in mine):
                    cis = [intervals.bootstrap(c["cases"], n_resamples=n_resamples, seed=0)["s"] for c in mine]
                    err = [[max(0, y - ci.low) for y, ci in zip(ys, cis)], [max(0, ci.high - y) for y, ci in zip(ys, cis)]]
                    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=2, label=f"from layer {start}")
                else:
                    ax.plot(xs, ys, "o-", label=f"from layer {start}")
            ax.set_title(f"{TITLE.get(method, method)}, B={b}")
            ax.set_xticks(sorted({k[3] for k in by}))
            ax.set_xlabel("layers in the window")
            ax.set_ylabel("S")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Spreading one batch over consecutive layers (S with bootstrap 95% intervals)")
    fig.tight_layout()
    fig.savefig(out_dir / "layer_windows.png", dpi=100)
    plt.close(fig)
    return text


# ============================================================================ batch degradation
def batch_degradation(cells: Sequence[Mapping], out_dir: Path, held_out: Sequence[int], onset_loss: float,
                      n_resamples: int) -> str:
    if not cells:
        return ""
    cells = sorted(cells, key=lambda c: (c["key"]["method"], c["key"]["layer"], c["key"]["batch_size"],
                                         c["key"].get("batch_index", 0)))
    rows = dm.rows_from_cells(cells)
    table = []
    for c in cells:
        k, d, p = c["key"], c["diagnostics"], c.get("paired", {})
        table.append([TITLE.get(k["method"], k["method"]), k["layer"], k["batch_size"], k.get("batch_index", 0),
                      "held out" if k["batch_size"] in held_out else "fit", _g(c["batch_per_d_ff"]),
                      _g(d["preservation_cost"]), _g(d["residual"]), _g(d["gram_min_eigenvalue"]),
                      _f(d["effective_rank"] / d["n_keys"], 2), _f(d["participation_ratio"] / d["n_keys"], 2),
                      _f(d["coherence"], 2), _f(d["delta_norm"]), _f(d["top_share"].get("0.01"), 3),
                      *[_ci(*p[m], sign=True) if m in p else "–" for m in ("es", "ps", "ns")]])
    text = ("## Why bigger batches edit worse: what each batch's solve says\n\n"
            "Per batch: B / d_ff; the preservation cost tr(dW C0 dW^T) / tr(W C0 W^T); the residual "
            "||W' K − V|| / ||V|| on the batch's own keys; the smallest eigenvalue of K^T C0^-1 K; its entropy "
            "effective rank and participation ratio per key; the largest |cosine| between two keys in the "
            "C0^-1 metric; ||dW||_F; the share of ||dW||_F^2 in C0's top 1% eigenvectors; and edited − "
            "unedited on the batch's cases [paired 95% interval].\n\n"
            + md_table(["method", "layer", "B", "batch", "split", "B/d_ff", "pres. cost", "residual", "λ_min",
                        "erank/B", "PR/B", "coherence", "‖dW‖", "top-1% share", "ΔES", "ΔPS", "ΔNS"], table) + "\n")
    fit_rows, _ = dm.split(rows, held_out)
    models = {}
    if len({r["batch_size"] for r in fit_rows}) < 2 or len(fit_rows) < 3:
        text += (f"\nThe fit split (batch sizes other than {', '.join(map(str, held_out))}) holds fewer than two batch "
                 "sizes: no degradation model is fitted.\n")
        (out_dir / "batch_degradation.md").write_text(text)
        _degradation_plot(rows, models, held_out, out_dir / "batch_degradation.png")
        return text
    # Rank correlations on the fit split, with intervals over fit-row resamples.
    corr_rows = []
    for name in (*dm.PREDICTORS, *dm.BASELINES):
        cells_ = [name]
        for target in dm.TARGETS:
            try:
                f = dm.fit_line(rows, target, name, held_out, n_resamples=n_resamples)
                cells_.append(f"{f.rho:+.2f} [{f.rho_interval[0]:+.2f}, {f.rho_interval[1]:+.2f}]")
            except ValueError:
                cells_.append("–")
        corr_rows.append(cells_)
    text += ("\n### Rank correlation with the loss, on the fit split (batch sizes other than "
             f"{', '.join(map(str, held_out))}; Spearman rho [bootstrap 95%])\n\n"
             "Losses in points on the batch's cases: NS loss = NS unedited − NS edited, PS loss = 100 − PS, "
             "ES loss = 100 − ES.\n\n" + md_table(["predictor", *dm.TARGETS], corr_rows) + "\n")
    model_rows, onset_lines = [], []
    for target in dm.TARGETS:
        try:
            chosen, _ = dm.choose_predictor(rows, target, held_out)
        except ValueError:  # e.g. a loss that does not vary on the fit split
            onset_lines.append(f"- {target}: no diagnostic correlates with it on the fit split")
            continue
        checks = {name: dm.check_held_out(dm.fit_line(rows, target, name, held_out, n_resamples=n_resamples), rows,
                                          held_out) for name in (chosen, "log2 B")}
        models[target] = checks
        for name, check in checks.items():
            f = check.fit
            model_rows.append([target, name, f"{f.intercept:+.2f} {f.slope:+.2f} x", f"{f.rho:+.2f}", f.n_fit,
                               len(check.rows), _f(check.rmse, 2), _f(100 * check.covered, 0) + "%"])
        f = checks[chosen].fit
        x_on = f.onset(onset_loss)
        onset_lines.append(f"- {target}: {chosen} = {_g(x_on)} predicts a loss of {onset_loss:g} points"
                           + _onset_sizes(rows, chosen, x_on, f.slope))
    text += ("\n### The degradation model: a line on the best-correlated diagnostic, fitted on the fit split, "
             "checked on the held-out batch sizes\n\n`log2 B` is the baseline (batch size alone). RMSE and coverage "
             "(the held-out losses inside their 95% prediction interval) on the held-out batches.\n\n"
             + md_table(["loss", "predictor x", "line", "rho (fit)", "fit rows", "held-out rows", "held-out RMSE",
                         "coverage"], model_rows) + "\n")
    pred_rows = []
    for target, checks in models.items():
        chosen = next(iter(checks))
        for r, est, lo, hi in checks[chosen].rows:
            pred_rows.append([target, TITLE.get(r["method"], r["method"]), r["layer"], r["batch_size"],
                              _ci(est, lo, hi), _f(r[target])])
    if pred_rows:
        text += ("\n#### Held-out batches: predicted [95% prediction interval] and measured\n\n"
                 + md_table(["loss", "method", "layer", "B", "predicted", "measured"], pred_rows) + "\n")
    if onset_lines:
        text += "\n#### Where degradation starts (from the diagnostics alone, no scoring)\n\n" + "\n".join(onset_lines) + "\n"
    (out_dir / "batch_degradation.md").write_text(text)
    _degradation_plot(rows, models, held_out, out_dir / "batch_degradation.png")
    return text


def _onset_sizes(rows, predictor, x_on, slope) -> str:
    """Per (method, layer): the smallest batch size whose diagnostic is past the onset value."""
    if not math.isfinite(x_on) or not slope:
        return ""
    parts = []
    for method, layer in sorted({(r["method"], r["layer"]) for r in rows}):
        mine = sorted((r for r in rows if (r["method"], r["layer"]) == (method, layer)), key=lambda r: r["batch_size"])
        past = [r["batch_size"] for r in mine if math.isfinite(r[predictor]) and (r[predictor] - x_on) * slope >= 0]
        parts.append(f"{TITLE.get(method, method)} L{layer}: B >= {past[0]}" if past else
                     f"{TITLE.get(method, method)} L{layer}: not within B <= {mine[-1]['batch_size']}")
    return " (" + "; ".join(parts) + ")"


def _degradation_plot(rows, models, held_out, path: Path) -> None:
    plt = _plt()
    shown = ("log10 preservation cost", "own-key residual", "log10 smallest eigenvalue / mean key norm")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    groups = sorted({(r["method"], r["layer"]) for r in rows})
    for ax, name in zip(axes[0], shown):
        for method, layer in groups:
            mine = sorted((r for r in rows if (r["method"], r["layer"]) == (method, layer)), key=lambda r: r["batch_size"])
            ax.plot([r["batch_size"] for r in mine], [r[name] for r in mine], "o-", ms=3,
                    label=f"{TITLE.get(method, method)} L{layer}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for ax, target in zip(axes[1], dm.TARGETS):
        checks = models.get(target)
        if not checks:
            ax.set_visible(False)
            continue
        fit = next(iter(checks.values())).fit
        fit_rows, held_rows = dm.split(rows, held_out)
        ax.plot([r[fit.predictor] for r in fit_rows], [r[target] for r in fit_rows], "o", ms=4, label="fit split")
        ax.plot([r[fit.predictor] for r in held_rows], [r[target] for r in held_rows], "s", ms=5, mfc="none",
                label=f"held out (B = {', '.join(map(str, held_out))})")
        xs = np.linspace(*np.nanpercentile([r[fit.predictor] for r in rows], [0, 100]), 50)
        ax.plot(xs, fit.intercept + fit.slope * xs, "-", color="grey", label=f"fit (rho {fit.rho:+.2f})")
        ax.set_xlabel(fit.predictor, fontsize=8)
        ax.set_ylabel(f"{target} (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("What the solve says about each batch (top) and how well it predicts the loss (bottom)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ============================================================================== late layers, PS
def _default_groups(kl_cells, trough: list[int], late: list[int]) -> tuple[list[int], list[int]]:
    layers = sorted({c["key"]["layer"] for c in kl_cells})
    if not trough:
        ns_loss = {}
        for c in kl_cells:
            before = np.nanmean([_nan(x["ns"]) for x in c["before_cases"]])
            ns_loss.setdefault(c["key"]["layer"], []).append(before - _nan(c["aggregate"]["ns"]))
        loss = [np.mean(ns_loss[l]) for l in layers]
        width = min(5, len(layers))
        start = max(range(len(layers) - width + 1), key=lambda i: sum(loss[i:i + width]))
        trough = layers[start:start + width]
    if not late:
        late = [l for l in layers if l > max(trough) and l != layers[-1]]
    return trough, late


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def late_layers(kl_cells, diag_cells, out_dir: Path, trough: list[int], late: list[int], ps_sizes: Sequence[int],
                n_resamples: int) -> str:
    text = ""
    if kl_cells:
        text += _neighbour_section(kl_cells, trough, late, n_resamples)
    if diag_cells:
        text += _paraphrase_section(diag_cells, ps_sizes, n_resamples)
    if not text:
        return ""
    (out_dir / "late_layers.md").write_text(text)
    _late_plot(kl_cells, diag_cells, out_dir / "late_layers.png", n_resamples)
    return text


def _kl_matrix(cells, method) -> tuple[list[int], list, np.ndarray, np.ndarray]:
    """(layers, case ids, KL at neighbour (layers, cases), KL at rewrite) on the cases all layers share."""
    mine = sorted((c for c in cells if c["key"]["method"] == method), key=lambda c: c["key"]["layer"])
    ids = [r["case_id"] for r in mine[0]["kl"]]
    for c in mine[1:]:
        have = {r["case_id"] for r in c["kl"]}
        ids = [i for i in ids if i in have]
    nb = np.asarray([[{r["case_id"]: r for r in c["kl"]}[i]["neighbour"] for i in ids] for c in mine])
    rw = np.asarray([[{r["case_id"]: r for r in c["kl"]}[i]["rewrite"] for i in ids] for c in mine])
    return [c["key"]["layer"] for c in mine], ids, nb, rw


def _neighbour_section(cells, trough, late, n_resamples) -> str:
    trough, late = _default_groups(cells, trough, late)
    rows, tests = [], []
    for method in sorted({c["key"]["method"] for c in cells}):
        layers, ids, nb, rw = _kl_matrix(cells, method)
        n = len(ids)
        for li, layer in enumerate(layers):
            c = next(c for c in cells if c["key"]["method"] == method and c["key"]["layer"] == layer)
            d, _ = _paired(c["cases"], c["before_cases"], n_resamples, ("ns", "em"))
            kn = bootstrap_statistic(lambda idx: nb[li, idx].mean(), n, n_resamples)
            kr = bootstrap_statistic(lambda idx: rw[li, idx].mean(), n, n_resamples)
            ratio = bootstrap_statistic(lambda idx: nb[li, idx].mean() / rw[li, idx].mean(), n, n_resamples)
            rows.append([TITLE.get(method, method), layer, n, f"{_g(kn[0])} [{_g(kn[1])}, {_g(kn[2])}]",
                         f"{_g(kr[0])} [{_g(kr[1])}, {_g(kr[2])}]", f"{_g(ratio[0])} [{_g(ratio[1])}, {_g(ratio[2])}]",
                         _ci(d["ns"].estimate, d["ns"].low, d["ns"].high, sign=True) if d else "–"])
        t = [i for i, l in enumerate(layers) if l in trough]
        g = [i for i, l in enumerate(layers) if l in late]
        if t and g:
            diff = bootstrap_statistic(lambda idx: nb[g][:, idx].mean() - nb[t][:, idx].mean(), n, n_resamples)
            rel = bootstrap_statistic(lambda idx: nb[g][:, idx].mean() / rw[g][:, idx].mean()
                                      - nb[t][:, idx].mean() / rw[t][:, idx].mean(), n, n_resamples)
            tests.append([TITLE.get(method, method), f"{layers[t[0]]}-{layers[t[-1]]}", f"{layers[g[0]]}-{layers[g[-1]]}",
                          f"{_g(diff[0])} [{_g(diff[1])}, {_g(diff[2])}]", verdict(diff[1], diff[2], expect_negative=True),
                          f"{_g(rel[0])} [{_g(rel[1])}, {_g(rel[2])}]", verdict(rel[1], rel[2], expect_negative=True)])
    text = ("## Why neighbours recover at late layers: how far a single edit moves the neighbour\n\n"
            "Per edit layer, over single edits (each on the unedited model): mean KL(unedited || edited) of the "
            "next token at the last token of the case's neighbourhood prompt and of its rewrite prompt (nats) "
            "[bootstrap 95% over cases]; their ratio (how much of the edit's own movement reaches the neighbour); "
            "NS edited − unedited [paired 95%].\n\n"
            + md_table(["method", "layer", "cases", "KL neighbour", "KL rewrite", "neighbour / rewrite", "ΔNS"], rows) + "\n")
    if tests:
        text += ("\n### Hypothesis: at late layers the update moves the neighbour's output less\n\n"
                 "Late layers − trough layers (where NS is lowest), on the same cases: the mean neighbour KL, and "
                 "the neighbour / rewrite ratio (less movement of the neighbour for the movement the edit makes "
                 "at its own prompt). `holds` when the interval lies below 0.\n\n"
                 + md_table(["method", "trough layers", "late layers", "Δ KL neighbour", "verdict",
                             "Δ neighbour / rewrite", "verdict"], tests) + "\n")
    return text


def _paraphrase_section(cells, ps_sizes, n_resamples) -> str:
    small, large = ps_sizes
    rows, tests = [], []
    by = {(c["key"]["method"], c["key"]["layer"], c["key"]["batch_size"]): c for c in cells
          if c.get("paraphrase") and not c["key"].get("batch_index")}
    for key in sorted(by):
        para = by[key]["paraphrase"]
        pc = para["cases"]
        if not pc:
            continue
        span = np.asarray([r["span_fraction"] for r in pc])
        own = np.asarray([r["own_fraction"] for r in pc])
        transfer = np.asarray([r["transfer"] for r in pc])
        control = np.asarray(para["control_span_fraction"])
        s = bootstrap_statistic(lambda idx: span[idx].mean(), len(span), n_resamples)
        t = bootstrap_statistic(lambda idx: transfer[idx].mean(), len(transfer), n_resamples)
        ctl = (bootstrap_statistic(lambda idx: control[idx].mean(), len(control), n_resamples) if len(control)
               else (float("nan"),) * 3)
        rows.append([TITLE.get(key[0], key[0]), key[1], key[2], len(pc), _ci(*s, digits=3), _f(own.mean(), 3),
                     _ci(*ctl, digits=3), _ci(*t, digits=3), _f(by[key]["aggregate"].get("ps"))])
    for method, layer in sorted({k[:2] for k in by}):
        a, b = by.get((method, layer, small)), by.get((method, layer, large))
        if a is None or b is None:
            continue
        sa = {r["case_id"]: r for r in a["paraphrase"]["cases"]}
        shared = [r for r in b["paraphrase"]["cases"] if r["case_id"] in sa]
        if len(shared) < 2:
            continue
        ds = np.asarray([r["span_fraction"] - sa[r["case_id"]]["span_fraction"] for r in shared])
        dt = np.asarray([r["transfer"] - sa[r["case_id"]]["transfer"] for r in shared])
        # The control keys are the same for both batches: their gain is paired over control keys, and
        # resampled independently of the cases.
        dc = (np.asarray(b["paraphrase"]["control_span_fraction"]) - np.asarray(a["paraphrase"]["control_span_fraction"])
              if len(a["paraphrase"]["control_span_fraction"]) else np.zeros(1))
        n = len(shared)
        ex = two_sample_bootstrap(ds, dc, n_resamples)
        tr = bootstrap_statistic(lambda idx: dt[idx].mean(), n, n_resamples)
        d, _ = _paired(b.get("cases"), a.get("cases"), n_resamples, ("ps",))
        tests.append([TITLE.get(method, method), layer, f"B={large} − B={small}", n, _ci(*ex, digits=3),
                      verdict(ex[1], ex[2]), _ci(*tr, digits=3), verdict(tr[1], tr[2]),
                      _ci(d["ps"].estimate, d["ps"].low, d["ps"].high, sign=True) if d else "–"])
    text = ("\n## Why PS rises from small to larger batches: the paraphrase's key against the batch keys' span\n\n"
            "Per batch, over its cases whose paraphrase names the subject: the fraction of the paraphrase key's "
            "squared C0^-1 norm inside the span of the batch's keys [bootstrap 95%], along its own key alone, and "
            "for control paraphrases of cases outside every batch; `transfer`: <dW k_para, r> / ||r||^2, the "
            "share of the case's residual the update writes at its paraphrase key.\n\n"
            + md_table(["method", "layer", "B", "cases", "span fraction", "own key", "control", "transfer", "PS"], rows)
            + "\n")
    if tests:
        text += (f"\n### Hypothesis: a larger batch shares directions that reach the paraphrases (B={small} -> {large})\n\n"
                 f"On the cases of the B={small} batch (the first {small} of the B={large} one): the gain in span "
                 "fraction beyond the control's gain (what a bigger span gives any phrasing), the gain in transfer, "
                 "and PS; `holds` when the interval lies above 0.\n\n"
                 + md_table(["method", "layer", "comparison", "cases", "Δ span − Δ control", "verdict", "Δ transfer",
                             "verdict", "ΔPS"], tests) + "\n")
    return text


def _late_plot(kl_cells, diag_cells, path: Path, n_resamples: int) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for method in sorted({c["key"]["method"] for c in kl_cells}):
        layers, ids, nb, rw = _kl_matrix(kl_cells, method)
        for arr, label, fmt in ((nb, "neighbour", "o-"), (rw, "rewrite", "s--")):
            est = [bootstrap_statistic(lambda idx: arr[i, idx].mean(), len(ids), n_resamples) for i in range(len(layers))]
            ys = [e[0] for e in est]
            ax.errorbar(layers, ys, yerr=[[max(0, y - e[1]) for y, e in zip(ys, est)],
                                          [max(0, e[2] - y) for y, e in zip(ys, est)]],
                        fmt=fmt, ms=3, capsize=2, label=f"{TITLE.get(method, method)}: {label}")
    if kl_cells:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("edit layer")
    ax.set_ylabel("mean KL at the last token (nats)")
    ax.set_title("How far a single edit moves each prompt's next token", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    by = {}
    for c in diag_cells:
        if c.get("paraphrase") and c["paraphrase"]["cases"] and not c["key"].get("batch_index"):
            by.setdefault((c["key"]["method"], c["key"]["layer"]), []).append(c)
    for (method, layer), mine in sorted(by.items()):
        mine.sort(key=lambda c: c["key"]["batch_size"])
        xs = [c["key"]["batch_size"] for c in mine]
        ax.plot(xs, [np.mean([r["span_fraction"] for r in c["paraphrase"]["cases"]]) for c in mine], "o-", ms=3,
                label=f"{TITLE.get(method, method)} L{layer}: paraphrase")
        ax.plot(xs, [np.mean(c["paraphrase"]["control_span_fraction"]) if c["paraphrase"]["control_span_fraction"]
                     else np.nan for c in mine], "x:", ms=4, label=f"{TITLE.get(method, method)} L{layer}: control")
    if by:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("fraction of the key in the batch keys' span")
    ax.set_title("Paraphrase keys against the span of the batch's keys (C0^-1 metric)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ========================================================================================= main
def summarize(windows_file=None, diagnostics_file=None, neighbour_kl_file=None, out_dir="experiments/results/open_questions",
              held_out=(512, 2048), onset_loss: float = 2.0, trough=(), late=(), ps_sizes=(16, 64),
              n_resamples: int = 1000) -> dict[str, str]:
    """Writes whichever sections the files allow; returns {section: markdown}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = _cells(windows_file, "layer_window")
    diags = _cells(diagnostics_file, "solve_diagnostics")
    kls = _cells(neighbour_kl_file, "neighbour_kl")
    parts = {"layer_windows": layer_windows(windows, out_dir, n_resamples),
             "batch_degradation": batch_degradation(diags, out_dir, tuple(held_out), onset_loss, n_resamples),
             "late_layers": late_layers(kls, diags, out_dir, list(trough), list(late), tuple(ps_sizes), n_resamples)}
    return {k: v for k, v in parts.items() if v}


def main(argv):
    del argv
    sizes = [int(x) for x in FLAGS.ps_batch_sizes.split(",")]
    if len(sizes) != 2:
        raise app.UsageError(f"--ps_batch_sizes takes two batch sizes, got {FLAGS.ps_batch_sizes!r}")
    parts = summarize(FLAGS.windows_file, FLAGS.diagnostics_file, FLAGS.neighbour_kl_file, FLAGS.questions_out_dir,
                      [int(x) for x in FLAGS.held_out_batch_sizes.split(",") if x], FLAGS.onset_loss,
                      parse_layers(FLAGS.trough_layers), parse_layers(FLAGS.late_layers), sizes,
                      FLAGS.questions_resamples)
    if not parts:
        logging.warning("no finished cells in the files given")
    for text in parts.values():
        print(text)


if __name__ == "__main__":
    app.run(main)
