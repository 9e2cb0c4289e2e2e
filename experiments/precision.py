"""bfloat16 against float32 edits of the same cases, compared case by case (experiments.precision_sweep's
records)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DECISIONS = ("es", "ps", "ns")
MARGINS = ("em", "pm", "nm")


def compare(cells: dict, folder: Path) -> str:
    """Markdown: per-dtype aggregates and seconds, then the decisions of every case against the first
    dtype's, for the edited and the unedited model, and the two updates' relative difference.

    cells: {dtype: precision_sweep cell record}, the reference first; folder: where the records'
    delta_file (each edit's change of down_proj, float32) lie."""
    names = list(cells)
    ref = cells[names[0]]
    lines = ["| dtype | ES | PS | NS | S | EM | PM | NM | unedited NS | ||dW|| | values s | keys + solve s | "
             "scoring s | C0 s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in names:
        c, s = cells[d], cells[d]["stage_seconds"]
        a = c["aggregate"]
        lines.append(f"| {d} | " + " | ".join(f"{a[k]:.1f}" for k in ("es", "ps", "ns", "s"))
                     + " | " + " | ".join(f"{a[k]:.3f}" for k in ("em", "pm", "nm"))
                     + f" | {c['before']['ns']:.1f} | {c['delta_norm']:.2f} | {s['values']:.0f} | "
                       f"{s['keys'] + s['solve']:.1f} | {s['scoring']:.1f} | {s['c0']:.1f} |")
    lines += ["", f"Against {names[0]}, case by case ({len(ref['cases'])} cases; a decision is ES, PS or NS of "
                  "one case):", "",
              "| dtype | model | decisions that differ | cases with a differing decision | max margin difference "
              "(points) | value loop: requests stopping at another step | values: max NLL difference | "
              "dW relative difference |", "|---|---|---|---|---|---|---|---|"]
    ref_delta = np.load(Path(folder) / ref["delta_file"])
    for d in names[1:]:
        c = cells[d]
        delta = np.load(Path(folder) / c["delta_file"])
        rel_dw = float(np.linalg.norm(delta - ref_delta) / np.linalg.norm(ref_delta))
        nll_diff = float(np.max(np.abs(np.asarray(c["value_nll"]) - np.asarray(ref["value_nll"]))))
        steps_differ = int(np.sum(np.asarray(c["value_steps"]) != np.asarray(ref["value_steps"])))
        for label, field in (("edited", "cases"), ("unedited", "before_cases")):
            a = {r["case_id"]: r for r in ref[field]}
            b = {r["case_id"]: r for r in c[field]}
            if a.keys() != b.keys():
                raise ValueError(f"the {names[0]} and {d} cells scored different cases")
            differ = [(i, k) for i in a for k in DECISIONS if a[i][k] != b[i][k]]
            margin = max(abs(a[i][k] - b[i][k]) for i in a for k in MARGINS
                         if a[i][k] is not None and b[i][k] is not None)
            cases_differ = sorted({i for i, _ in differ})
            detail = ", ".join(f"{i} {k.upper()}" for i, k in differ[:8]) + (" ..." if len(differ) > 8 else "")
            lines.append(f"| {d} | {label} | {len(differ)} of {len(a) * len(DECISIONS)}"
                         + (f" ({detail})" if differ else "") + f" | {len(cases_differ)} | {margin:.4f} | "
                         + (f"{steps_differ} of {len(c['value_steps'])} | {nll_diff:.3f} | {rel_dw:.3f} |"
                            if label == "edited" else "| | |"))
    return "\n".join(lines)
