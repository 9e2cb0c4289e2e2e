"""Tables and plots of lifelong-editing runs (experiments.lifelong), finished or still running.

  lifelong.md    per cell: edits reached (and per d_ff), why it stopped, retention (ES, EM, NS with
                 95% bootstrap intervals over the cases edited so far), perplexity, general accuracy,
                 weight change; and general ability unedited and after 256, 1024 and 4096 edits
  lifelong.png   against edits so far (and edits per d_ff), one line per (method, batch size, ENCORE
                 options): retention ES and NS with bands, perplexity, general accuracy, ||W - W0|| / ||W0||

A cell's batch records are grouped by attempt (the run's identity, the same across resumes), so a run
still going is shown up to its last measured batch.

  python -m experiments.lifelong_summary --lifelong_file=experiments/results/raw/lifelong.jsonl \\
      --lifelong_out_dir=experiments/results/lifelong
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import results_log

# Flag names of their own: the test suite imports this module beside experiments.summarize.
flags.DEFINE_string("lifelong_file", "runs/lifelong.jsonl", "experiments.lifelong's JSONL results")
flags.DEFINE_string("lifelong_out_dir", "experiments/results/lifelong", "where lifelong.md and lifelong.png go")
flags.DEFINE_integer("lifelong_resamples", 1000, "resamples of the cases for each 95% interval")
FLAGS = flags.FLAGS

MILESTONES = (256, 1024, 4096)


def runs(records) -> dict[tuple, dict]:
    """{(method, batch size, mpes, norm constraint): {"batches": measured batch records in order,
    "cell": the cell record or None}} for each cell's latest attempt."""
    by_attempt: dict[tuple, dict] = {}
    for r in records:
        if r.get("type") not in ("batch", "cell") or "key" not in r:
            continue
        k = r["key"]
        name = (k["method"], int(k["batch_size"]), bool(k.get("most_probable_stop")), float(k.get("norm_constraint", 0)))
        run = by_attempt.setdefault((name, r.get("attempt")), {"batches": {}, "cell": None, "order": len(by_attempt)})
        if r["type"] == "batch":
            run["batches"][r["batch_index"]] = r
        else:
            run["cell"] = r
    latest: dict[tuple, dict] = {}
    for (name, _), run in sorted(by_attempt.items(), key=lambda kv: kv[1]["order"]):
        batches = [run["batches"][i] for i in sorted(run["batches"])]
        latest[name] = {"batches": [b for b in batches if "monitor" in b], "cell": run["cell"]}
    return latest


def label(name: tuple) -> str:
    method, b, mpes, norm = name
    extra = "+".join(x for x in ("MPES" if mpes else "", f"norm {norm:g}" if norm else "") if x)
    return f"{method} B={b}" + (f" ({extra})" if extra else "")


def _interval(values, n_resamples: int, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if not v.size:
        return (math.nan,) * 3
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_resamples, v.size))
    draws = v[idx].mean(axis=1)
    return float(v.mean()), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _f(x, digits=1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(latest: dict, n_resamples: int) -> str:
    lines = ["| run | edits | edits / d_ff | stopped | ES [95%] | EM [95%] | NS [95%] | perplexity (unedited) | "
             "general acc. (unedited) | ‖W−W0‖/‖W0‖ |", "|" + "---|" * 10]
    for name, run in latest.items():
        if not run["batches"]:
            continue
        last = run["batches"][-1]
        m = last["monitor"]
        cell = run["cell"]
        unedited = cell["unedited"] if cell else None
        cases = m.get("retention_cases", {})
        ivs = {k: _interval(cases.get(k, []), n_resamples) for k in ("es", "em", "ns")}
        ret = {k: f"{_f(e)} [{_f(lo)}, {_f(hi)}]" for k, (e, lo, hi) in ivs.items()}
        state = (cell["stopped"] or "no") if cell else "running"
        lines.append(f"| {label(name)} | {last['edits_so_far']} | {last['edits_per_dff']:.3f} | {state} | {ret['es']} | "
                     f"{ret['em']} | {ret['ns']} | {_f(m['perplexity'], 2)} ({_f(unedited['perplexity'], 2) if unedited else '–'}) | "
                     f"{_f(m['general_accuracy'])} ({_f(unedited['general_accuracy']) if unedited else '–'}) | "
                     f"{max(m['weight_change'].values()):.3f} |")
    return "\n".join(lines)


def general_table(latest: dict) -> str:
    """General ability per task: unedited and at each milestone reached, per run."""
    tasks = None
    rows = []
    for name, run in latest.items():
        if not run["batches"]:
            continue
        cell = run["cell"]
        points = ([("unedited", cell["unedited"])] if cell else []) + [
            (str(b["edits_so_far"]), b["monitor"]) for b in run["batches"] if b["edits_so_far"] in MILESTONES]
        for when, m in points:
            tasks = tasks or sorted(m["general"])
            rows.append(f"| {label(name)} | {when} | " + " | ".join(_f(m["general"][t]) for t in tasks)
                        + f" | {_f(m['general_accuracy'])} | {_f(m['perplexity'], 2)} |")
    if not rows:
        return "(no measurements yet)"
    head = "| run | edits | " + " | ".join(tasks) + " | mean | perplexity |"
    return "\n".join([head, "|" + "---|" * (len(tasks) + 4)] + rows)


def plot(latest: dict, path: Path, n_resamples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ES", "retention: ES over the cases edited so far"), ("NS", "retention: NS over the cases so far"),
              ("perplexity", "held-out perplexity"), ("general", "mean general accuracy"),
              ("weight", "‖W − W0‖ / ‖W0‖ (edited layer)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    d_ff = None
    for name, run in latest.items():
        if not run["batches"]:
            continue
        x = [b["edits_so_far"] for b in run["batches"]]
        d_ff = d_ff or run["batches"][0]["edits_so_far"] / run["batches"][0]["edits_per_dff"]
        for ax, (what, _) in zip(axes, panels):
            if what in ("ES", "NS"):
                ivs = [_interval(b["monitor"].get("retention_cases", {}).get(what.lower(), []), n_resamples)
                       for b in run["batches"]]
                est, lo, hi = (np.asarray(v) for v in zip(*ivs))
                line, = ax.plot(x, est, marker="o", ms=3, label=label(name))
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            elif what in ("perplexity", "general"):
                field = "perplexity" if what == "perplexity" else "general_accuracy"
                line, = ax.plot(x, [b["monitor"][field] for b in run["batches"]], marker="o", ms=3)
                if run["cell"]:  # the unedited model's value, dashed
                    ax.axhline(run["cell"]["unedited"][field], color=line.get_color(), ls="--", lw=0.8)
            else:
                ax.plot(x, [max(b["monitor"]["weight_change"].values()) for b in run["batches"]], marker="o", ms=3)
    for ax, (what, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits so far")
        ax.grid(alpha=0.3)
        if d_ff:
            top = ax.secondary_xaxis("top", functions=(lambda e: e / d_ff, lambda r: r * d_ff))
            top.set_xlabel("edits / d_ff", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    latest = runs(results_log.read_jsonl(FLAGS.lifelong_file))
    out = Path(FLAGS.lifelong_out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ("## Lifelong editing runs\n\n" + table(latest, FLAGS.lifelong_resamples)
            + "\n\n## General ability\n\n" + general_table(latest) + "\n")
    (out / "lifelong.md").write_text(text)
    plot(latest, out / "lifelong.png", FLAGS.lifelong_resamples)
    print(text)


if __name__ == "__main__":
    app.run(main)
