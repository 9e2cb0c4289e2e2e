"""Plots and tables of a causal trace's JSONL records (experiments.causal_trace), in the style of the ROME
paper's figures:

  causal_trace_<known_id>.png        one fact: P(object) with each state restored, token x layer,
                                     for residual, MLP and attention outputs (Figure 1)
  average_indirect_effect.png        the average indirect effect per token group against the layer,
                                     one panel per kind
  average_indirect_effect_grid.png   the same as token group x layer heatmaps (Figure 2)
  causal_trace.md                    facts traced and skipped, the peaks, and every value
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from experiments import results_log
from jaxedit.tracing.groups import TOKEN_GROUPS, average_by_group, peak_layer_interval

KINDS = ("resid", "mlp", "attn")
KIND_NAME = {"resid": "residual output (single layer)", "mlp": "MLP output", "attn": "attention output"}
CMAP = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setting(key: Mapping) -> tuple:
    return tuple(sorted((k, v) for k, v in key.items() if k != "known_id"))


def current_records(records: Sequence[Mapping]) -> list[dict]:
    """The causal-trace cells of the file's latest setting (model, knowns, noise...), in file order."""
    cells, _ = results_log.latest_complete(records)
    cells = [c for c in cells.values() if c["key"].get("sweep") == "causal_trace"]
    if not cells:
        return []
    settings = collections.Counter(_setting(c["key"]) for c in cells)
    latest = _setting(cells[-1]["key"])
    if len(settings) > 1:
        logging.warning("%d settings in the results; summarising the latest one (%d facts): %s", len(settings),
                        settings[latest], dict(latest))
    return [c for c in cells if _setting(c["key"]) == latest]


def effects(record: Mapping) -> np.ndarray:
    """(kinds, L, T) indirect effects of a traced record."""
    return np.asarray([record["scores"][k] for k in KINDS], np.float64) - record["p_corrupt"]


def _window_label(kind: str, key: Mapping) -> str:
    if kind == "resid":
        return "single restored layer"
    return f"centre of {key.get('window', 10)} restored {kind.upper()} layers"


def fact_heatmap(record: Mapping, path: Path) -> None:
    """Figure 1 for one fact: three token x layer grids of P(object), from the corrupted runs' P up."""
    plt = _plt()
    tokens = list(record["tokens"])
    start, end = record["subject_range"]
    labels = [f"{t!r}*" if start <= i < end else repr(t) for i, t in enumerate(tokens)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(tokens) + 1.8))
    for ax, kind in zip(axes, KINDS):
        grid = np.asarray(record["scores"][kind]).T  # (T, L)
        image = ax.pcolor(grid, cmap=CMAP[kind], vmin=record["p_corrupt"], vmax=max(grid.max(), record["p_corrupt"] + 1e-6))
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(tokens)) + 0.5)
        ax.set_yticklabels(labels, fontsize=8)
        step = 5 if grid.shape[1] > 10 else 1
        ax.set_xticks(np.arange(0, grid.shape[1], step) + 0.5)
        ax.set_xticklabels(range(0, grid.shape[1], step))
        ax.set_xlabel(_window_label(kind, record["key"]))
        ax.set_title(f"restoring the {KIND_NAME[kind]}", fontsize=10)
        fig.colorbar(image, ax=ax).ax.set_title(f"p({record['target_text'].strip()})", fontsize=8)
    fig.suptitle(f"{record['prompt']} -> {record['target_text']!r}  (clean p {record['p_clean']:.3f}, corrupted "
                 f"p {record['p_corrupt']:.3f}; subject tokens starred)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(mean: np.ndarray, counts, key: Mapping, n: int, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharey=True)
    layers = np.arange(mean.shape[2])
    for ax, k, kind in zip(axes, range(3), KINDS):
        for g, group in enumerate(TOKEN_GROUPS):
            if counts[g]:
                ax.plot(layers, mean[k, g], "-", color=f"C{g}", lw=2.2 if "last" in group else 1.2, label=group)
        ax.set_title(f"restoring the {KIND_NAME[kind]}", fontsize=10)
        ax.set_xlabel(_window_label(kind, key))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("average indirect effect on p(object)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Average indirect effect over {n} known facts ({key['model']}, {key['noise_samples']} noise samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _group_grids(mean: np.ndarray, key: Mapping, n: int, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 2.8))
    for ax, k, kind in zip(axes, range(3), KINDS):
        image = ax.pcolor(np.nan_to_num(mean[k]), cmap=CMAP[kind])
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(TOKEN_GROUPS)) + 0.5)
        ax.set_yticklabels(TOKEN_GROUPS, fontsize=8)
        ax.set_xticks(np.arange(0, mean.shape[2], 5) + 0.5)
        ax.set_xticklabels(range(0, mean.shape[2], 5))
        ax.set_xlabel(_window_label(kind, key))
        ax.set_title(f"AIE, {KIND_NAME[kind]}", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"Average indirect effect over {n} facts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _f(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.4f}"


def summarize(records: Sequence[Mapping], out_dir, heatmap_ids: Sequence[int] | None = None,
              bootstrap_resamples: int = 1000) -> str:
    """Writes the plots and causal_trace.md for the latest setting in `records`; returns the markdown."""
    out_dir = Path(out_dir)
    cells = current_records(records)
    if not cells:
        logging.warning("no causal-trace records to summarise")
        return ""
    out_dir.mkdir(parents=True, exist_ok=True)
    traced = [c for c in cells if c["status"] == "traced"]
    reasons = collections.Counter(c["reason"] for c in cells if c["status"] == "skipped")
    key = cells[-1]["key"]
    lines = [f"# Causal tracing: {key['model']}, {key['knowns']}", "",
             f"{len(cells)} facts looked at in file order: {len(traced)} traced, "
             f"{sum(reasons.values())} skipped"
             + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")" if reasons else "") + ".",
             "`not_known`: the model's greedy next token is not the attribute's first token; `subject_tokens`: "
             "the subject's boundaries are not token boundaries.", "",
             f"Noise samples {key['noise_samples']}, noise std {key['noise_factor']} x the std of the subject "
             f"tokens' embeddings" + (f" = {traced[0]['noise_std']:.4f}" if traced else "")
             + f", MLP and attention windows of {key['window']} layers."]
    if not traced:
        text = "\n".join(lines) + "\n"
        (out_dir / "causal_trace.md").write_text(text)
        return text
    p_clean = np.mean([c["p_clean"] for c in traced])
    p_corrupt = np.mean([c["p_corrupt"] for c in traced])
    lines += [f"Mean P(object): clean {p_clean:.4f}, corrupted {p_corrupt:.4f} (total effect "
              f"{p_clean - p_corrupt:.4f}).", ""]
    per_fact = [effects(c) for c in traced], [tuple(c["subject_range"]) for c in traced]
    mean, counts = average_by_group(*per_fact)
    intervals = peak_layer_interval(*per_fact, n_resamples=bootstrap_resamples)
    peak_rows = []
    for g, group in enumerate(TOKEN_GROUPS):
        row = [group, int(counts[g])]
        for k in range(3):
            curve = mean[k, g]
            if np.all(np.isnan(curve)):
                row.append("–")
            else:
                at = int(np.nanargmax(curve))
                low, high = intervals[k, g]
                row.append(f"{curve[at]:.4f} at layer {at} [{low}, {high}]")
        peak_rows.append(row)
    lines += ["## Peak average indirect effect per token group", "",
              "Tokens of every traced fact pooled per group (a token may count in two groups, as in the paper). "
              f"In brackets: a bootstrap 95% interval of the peak's layer ({bootstrap_resamples} resamples of the "
              "traced facts). For MLP and attention outputs the layer is the centre of the restored window "
              f"(layers l - {key['window'] // 2} .. l + {(key['window'] - 1) // 2}).", "",
              _table(["token group", "tokens", *[f"{KIND_NAME[k]}" for k in KINDS]], peak_rows), ""]
    for k, kind in enumerate(KINDS):
        rows = [[layer, *[_f(mean[k, g, layer]) for g in range(len(TOKEN_GROUPS))]] for layer in range(mean.shape[2])]
        lines += [f"## Average indirect effect, {KIND_NAME[kind]}", "",
                  _table(["layer" if kind == "resid" else "centre layer", *TOKEN_GROUPS], rows), ""]
    _curves(mean, counts, key, len(traced), out_dir / "average_indirect_effect.png")
    _group_grids(mean, key, len(traced), out_dir / "average_indirect_effect_grid.png")
    by_id = {c["key"]["known_id"]: c for c in traced}
    ids = list(heatmap_ids) if heatmap_ids else [c["key"]["known_id"] for c in traced[:2]]
    for known_id in ids:
        if known_id in by_id:
            fact_heatmap(by_id[known_id], out_dir / f"causal_trace_{known_id}.png")
        else:
            logging.warning("known_id %s was not traced: no heatmap", known_id)
    text = "\n".join(lines)
    (out_dir / "causal_trace.md").write_text(text)
    return text
