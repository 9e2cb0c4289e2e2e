"""Markdown tables and PNG plots (matplotlib, Agg) from the sweeps' JSONL files, in the style of Yoon et
al. 2024's figures:

  layer_sweep.{md,png}       metrics vs edit layer, one line per method (figs 1-2)
  batch_sweep.{md,png}       metrics vs batch size, MEMIT vs EMMET (fig. 3)
  sequential_sweep.{md,png}  sequential-batched editing: metrics right after each batch vs number of
                             edits so far, one line per batch size, and metrics over all edits at the
                             end vs batch size (figs 4-6)
  summary.md                 all tables

Only complete cells count: per cell, its last "cell" record and the per-batch records of that same
attempt (experiments.results_log.latest_complete), so cells recomputed after a crash appear once.

  python -m experiments.summarize --runs_dir=runs --out_dir=experiments/results
"""
from __future__ import annotations

import logging
import math

import numpy as np
from pathlib import Path
from typing import Mapping, Sequence

from absl import app, flags
from tqdm.auto import tqdm

from experiments import paired, records, results_log
from jaxedit.eval import intervals
from jaxedit.methods import METHODS
from jaxedit.eval.metrics import harmonic_mean

flags.DEFINE_string("runs_dir", "runs", "folder with layer_sweep.jsonl, batch_sweep.jsonl, sequential_sweep.jsonl")
flags.DEFINE_string("layer_file", None, "layer sweep JSONL (default <runs_dir>/layer_sweep.jsonl)")
flags.DEFINE_string("batch_file", None, "batch sweep JSONL (default <runs_dir>/batch_sweep.jsonl)")
flags.DEFINE_string("sequential_file", None, "sequential sweep JSONL (default <runs_dir>/sequential_sweep.jsonl)")
flags.DEFINE_string("out_dir", "experiments/results", "where the .md and .png files go")
flags.DEFINE_integer("bootstrap_resamples", 1000, "resamples of the cases for each 95% interval")
FLAGS = flags.FLAGS

SHOWN = ("es", "ps", "ns", "s", "em", "pm", "nm")
PLOTTED = ("es", "ps", "ns", "s")
LABEL = {"es": "Efficacy score (ES)", "ps": "Paraphrase score (PS)", "ns": "Neighbourhood score (NS)",
         "s": "Overall score (S)", "em": "EM", "pm": "PM", "nm": "NM"}
NAME = {m.name: m.title for m in METHODS.values()}


def _style_panel(ax, title: str, xlabel: str, log_x: bool = False, **title_kw):
    """The look shared by every panel: percent axis, grid, optional log2 x axis."""
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_title(title, **title_kw)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_cells(agg: Mapping, cases: Sequence[Mapping] | None = None) -> list[str]:
    """The shown metrics of an aggregate; with the cell's per-case rows, each with its bootstrap 95%
    interval over cases (S recomputed inside every resample; jaxedit.eval.intervals)."""
    if not cases:
        return [_f(agg.get(k)) for k in SHOWN]
    ci = _intervals(cases)
    return [f"{_f(agg.get(k))} [{_f(ci[k].low)}, {_f(ci[k].high)}]" for k in SHOWN]


def _intervals(cases: Sequence[Mapping]) -> dict:
    return intervals.bootstrap(cases, n_resamples=FLAGS.bootstrap_resamples if FLAGS.is_parsed() else 1000,
                               seed=0)


def _error_bars(ax, xs, aggregates, case_lists, k, label, fmt="o-"):
    """A metric across cells, with its bootstrap interval as error bars where the cells carry cases."""
    ys = [_nan(a[k]) for a in aggregates]
    if all(case_lists):
        cis = [_intervals(cases)[k] for cases in case_lists]
        yerr = [[max(0.0, y - ci.low) for y, ci in zip(ys, cis)], [max(0.0, ci.high - y) for y, ci in zip(ys, cis)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt=fmt, capsize=2, label=label)
    else:
        ax.plot(xs, ys, fmt, label=label)


def _models(cells) -> list[str]:
    return sorted({c["key"].get("model", "?") for c in cells})


def _label(key: Mapping, many_models: bool) -> str:
    name = NAME.get(key["method"], key["method"])
    return f"{name} ({key.get('model')})" if many_models else name


def _paired_section(rows) -> str:
    """The paired differences a sweep's findings rest on (experiments.paired), as a markdown section."""
    if not rows:
        return ""
    return ("\n### Paired differences (same cases; bootstrap 95% interval)\n\n"
            "A − B on the cases both share; `higher`/`lower`: the interval excludes 0, else `cannot tell`.\n\n"
            + md_table(paired.HEADER, rows) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finished_cells(records, sweep: str, order: str) -> list[dict]:
    """The finished cells of one sweep, by model, method and `order` (a key field)."""
    cells, _ = results_log.latest_complete(records)
    cells = [c for c in cells.values() if c["key"].get("sweep") == sweep]
    return sorted(cells, key=lambda c: (c["key"].get("model"), c["key"]["method"], c["key"][order]))


# ================================================================================ layer sweep
def layer_sweep(records, out_dir: Path) -> str:
    cells = _finished_cells(records, "layer", "layer")
    if not cells:
        return ""
    many = len(_models(cells)) > 1
    rows = [[_label(c["key"], many), c["key"]["layer"], c["aggregate"]["n_cases"],
             *_metric_cells(c["aggregate"], c.get("cases"))] for c in cells]
    table = md_table(["method", "layer", "N", *[k.upper() for k in SHOWN]], rows)
    best = []
    for label in dict.fromkeys(_label(c["key"], many) for c in cells):
        mine = [c for c in cells if _label(c["key"], many) == label]
        top = max(mine, key=lambda c: (c["aggregate"]["s"] or 0.0))
        best.append(f"- {label}: best S {_f(top['aggregate']['s'])} at layer {top['key']['layer']}")
    text = ("## Layer sweep (single edits, each on the unedited model)\n\nEach metric: the aggregate over the "
            "cell's cases [bootstrap 95% interval over cases].\n\n" + table) + "\n\n" + "\n".join(best) + "\n"
    text += _paired_section(paired.layer_rows(cells, lambda k: _label(k, many)))
    (out_dir / "layer_sweep.md").write_text(text)

    _metric_panels(cells, many, "layer", "edit layer", "Single edits by layer (N per cell in layer_sweep.md)",
                   out_dir / "layer_sweep.png")
    return text


def _metric_panels(cells, many: bool, x_field: str, x_label: str, title: str, path: Path, log_x: bool = False,
                   reference: Mapping | None = None) -> None:
    """One panel per plotted metric, one line per method across the cells' `x_field`, with bootstrap
    error bars; `reference` ({x: aggregate}) is drawn dashed (the same cases unedited)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.4))
    for ax, k in zip(axes, tqdm(PLOTTED, desc=path.stem, leave=False)):
        for label in dict.fromkeys(_label(c["key"], many) for c in cells):
            mine = [c for c in cells if _label(c["key"], many) == label]
            _error_bars(ax, [c["key"][x_field] for c in mine], [c["aggregate"] for c in mine],
                        [c.get("cases") for c in mine], k, label)
        if reference:
            xs = sorted(reference)
            ax.plot(xs, [_nan(reference[x].get(k)) for x in xs], "--", color="grey", label="unedited")
        _style_panel(ax, LABEL[k], x_label, log_x=log_x)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan(x):
    return float("nan") if x is None else float(x)


# ================================================================================ batch sweep
def batch_sweep(records, out_dir: Path) -> str:
    cells = _finished_cells(records, "batch", "batch_size")
    if not cells:
        return ""
    many = len(_models(cells)) > 1
    rows = [[_label(c["key"], many), c["key"]["layer"], c["key"]["batch_size"],
             *_metric_cells(c["aggregate"], c.get("cases"))] for c in cells]
    before = {}
    for c in cells:
        if c.get("before"):
            before.setdefault(c["key"]["batch_size"], c["before"])
    rows += [["unedited", "–", b, *_metric_cells(a)] for b, a in sorted(before.items())]
    text = ("## Batch sweep (one batch edit per cell; metrics over the batch's cases)\n\nEach metric: the "
            "aggregate over the cell's cases [bootstrap 95% interval over cases].\n\n"
            + md_table(["method", "layer", "batch size", *[k.upper() for k in SHOWN]], rows) + "\n")
    text += _paired_section(paired.batch_rows(cells, lambda k: _label(k, many)))
    (out_dir / "batch_sweep.md").write_text(text)

    # the same cases unedited, dashed: NS is read against it
    _metric_panels(cells, many, "batch_size", "batch size", "Batch editing: MEMIT vs EMMET", out_dir / "batch_sweep.png",
                   log_x=True, reference=before)
    return text


# =========================================================================== sequential sweep
def batch_windows(batches: Sequence[Mapping], max_windows: int) -> list[dict]:
    """Consecutive batches grouped into at most max_windows windows (each batch alone when few): per
    window its first and last batch index, the edits made by its end, and its after-batch scores
    aggregated over the window (a single case's NS is 0 or 100; windows make trends readable).

    A window's ES, PS, NS and margins are means over its cases (over its batches' scores, weighted by
    their case counts, where batches carry no per-case rows), and its S is the harmonic mean of those
    ES, PS and NS, as for any aggregate: never a mean of per-batch S.
    """
    n = len(batches)
    bounds = np.linspace(0, n, min(n, max_windows) + 1).round().astype(int)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = batches[lo:hi]
        if all(b.get("cases") for b in part):
            agg = records.aggregate_cases([c for b in part for c in b["cases"]])
        else:
            weights = [b["after_batch"].get("n_cases") or 1 for b in part]
            agg = {m: _mean([_nan(b["after_batch"].get(m)) for b in part], weights) for m in SHOWN if m != "s"}
            agg["s"] = harmonic_mean([agg["es"], agg["ps"], agg["ns"]])
        out.append({"first": part[0]["batch_index"], "last": part[-1]["batch_index"],
                    "edits_so_far": part[-1]["edits_so_far"],
                    "after_batch": {m: _nan(agg.get(m)) for m in SHOWN}})
    return out


def _mean(values, weights=None) -> float:
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    keep = ~np.isnan(v)
    return float(np.sum(v[keep] * w[keep]) / np.sum(w[keep])) if keep.any() else float("nan")


def sequential_sweep(records, out_dir: Path, max_rows: int = 8, max_points: int = 8) -> str:
    cells, batches = results_log.latest_complete(records)
    keys = [k for k, c in cells.items() if c["key"].get("sweep") == "sequential"]
    if not keys:
        return ""
    many = len(_models([cells[k] for k in keys])) > 1
    keys.sort(key=lambda k: (cells[k]["key"].get("model"), cells[k]["key"]["method"], cells[k]["key"]["batch_size"]))
    rows = []
    for k in keys:
        c = cells[k]
        key = c["key"]
        rows.append([_label(key, many), key["batch_size"], key["total"], c.get("n_batches", len(batches[k])),
                     "final, all edits", *_metric_cells(c["final_all"], c.get("final_cases"))])
        rows.append(["", "", "", "", "after each batch (mean)", *_metric_cells(c["after_batch_mean"])])
    befores = {(cells[k]["key"].get("model"), cells[k]["key"]["total"]): cells[k]["before"]
               for k in keys if cells[k].get("before")}
    for (model, total), agg in befores.items():
        rows.append(["unedited" + (f" ({model})" if many else ""), "–", total, 0, "the same cases", *_metric_cells(agg)])
    text = ("## Sequential-batched sweep\n\n"
            "`final, all edits`: measured once after the last batch, over all edits of the cell. "
            "`after each batch (mean)`: each batch measured right after it was applied, on its own cases, "
            "then aggregated over all batches.\n\n"
            + md_table(["method", "batch size", "total edits", "batches", "measured", *[k.upper() for k in SHOWN]],
                       rows) + "\n")
    per_batch_rows = []
    for k in keys:
        key = cells[k]["key"]
        for w in batch_windows(batches[k], max_rows):
            span = str(w["first"]) if w["first"] == w["last"] else f"{w['first']}-{w['last']}"
            per_batch_rows.append([_label(key, many), key["batch_size"], span, w["edits_so_far"],
                                   *_metric_cells(w["after_batch"])])
    text += ("\n### Right after each batch (on that batch's cases)\n\n"
             f"With more than {max_rows} batches, consecutive batches are grouped and their scores averaged.\n\n"
             + md_table(["method", "batch size", "batches", "edits so far", *[k.upper() for k in SHOWN]],
                        per_batch_rows) + "\n")
    text += _paired_section(paired.sequential_rows([cells[k] for k in keys], lambda k: _label(k, many)))
    (out_dir / "sequential_sweep.md").write_text(text)

    plt = _plt()
    methods = list(dict.fromkeys(_label(cells[k]["key"], many) for k in keys))
    fig, axes = plt.subplots(len(methods) + 1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2 * (len(methods) + 1)),
                             squeeze=False)
    for row, label in enumerate(tqdm(methods, desc="sequential plot", leave=False)):
        mine = [k for k in keys if _label(cells[k]["key"], many) == label]
        for col, m in enumerate(PLOTTED):
            ax = axes[row][col]
            for k in mine:
                ws = batch_windows(batches[k], max_points)
                ax.plot([w["edits_so_far"] for w in ws], [w["after_batch"][m] for w in ws], "o-",
                        ms=3, label=f"B={cells[k]['key']['batch_size']}")
            _style_panel(ax, f"{label}: {LABEL[m]}\n(right after each batch; <= {max_points} window means)",
                         "edits so far", fontsize=9)
        axes[row][0].legend(fontsize=8)
    for col, m in enumerate(PLOTTED):
        ax = axes[-1][col]
        for label in methods:
            mine = [k for k in keys if _label(cells[k]["key"], many) == label]
            _error_bars(ax, [cells[k]["key"]["batch_size"] for k in mine], [cells[k]["final_all"] for k in mine],
                        [cells[k].get("final_cases") for k in mine], m, label)
        _style_panel(ax, f"{LABEL[m]}\n(after all edits, over all edits)", "batch size", log_x=True, fontsize=9)
    axes[-1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sequential_sweep.png", dpi=100)
    plt.close(fig)
    return text


def summarize(layer_file, batch_file, sequential_file, out_dir) -> dict[str, str]:
    """Writes the tables and plots of whichever files exist; returns {section: markdown}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, path, fn in (("layer", layer_file, layer_sweep), ("batch", batch_file, batch_sweep),
                           ("sequential", sequential_file, sequential_sweep)):
        if path is None or not Path(path).exists():
            continue
        text = fn(results_log.read_jsonl(path), out_dir)
        if text:
            parts[name] = text
    if parts:
        (out_dir / "summary.md").write_text("# Sweep results\n\n" + "\n".join(parts.values()))
    return parts


def main(argv):
    del argv
    runs = Path(FLAGS.runs_dir)
    parts = summarize(FLAGS.layer_file or runs / "layer_sweep.jsonl", FLAGS.batch_file or runs / "batch_sweep.jsonl",
                      FLAGS.sequential_file or runs / "sequential_sweep.jsonl", FLAGS.out_dir)
    if not parts:
        logging.warning("no results found under %s", runs)
    for text in parts.values():
        print(text)


if __name__ == "__main__":
    app.run(main)
