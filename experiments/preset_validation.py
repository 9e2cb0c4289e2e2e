"""Hparams presets chosen on a validation split: a grid of one method's solve settings, each cell a
batch edit of the same --n validation cases (CounterFact "train": case ids disjoint from the "edit"
cases every reported sweep uses), scored with bootstrap 95% intervals.

Grids (the value optimisation does not depend on them, so the targets are computed once per layer):
  memit:     mom2_update_weight (lambda) x layer
  alphaedit: nullspace_threshold x l2, at the preset's layer(s)

The rule (--ns_margin): among cells whose NS is within the margin of the unedited NS, the largest S
(ties: the first in the grid's order); the chosen cell is marked in the table. One JSONL record per finished cell; a restart skips them.

  python -m experiments.preset_validation --method=alphaedit --grid_a=3e-3,5e-3,1e-2,2e-2 \\
      --grid_b=1,10,100 --n=32 --out=experiments/results/preset_validation.jsonl
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import records
from experiments import results_log
from experiments import world

flags.DEFINE_string("method", "alphaedit", "memit (lambda x layer) or alphaedit (threshold x l2)")
flags.DEFINE_string("grid_a", None, "memit: lambdas; alphaedit: null-space thresholds (comma-separated)")
flags.DEFINE_string("grid_b", None, "memit: layers; alphaedit: l2 values (comma-separated)")
flags.DEFINE_integer("n", 32, "validation cases, edited as one batch per cell")
flags.DEFINE_float("ns_margin", 5.0, "NS may fall at most this many points below the unedited NS")
flags.DEFINE_string("table", None, "markdown table to write (default: next to --out, .md)")
program.define_common_flags("runs/preset_validation.jsonl")
FLAGS = flags.FLAGS
flags.FLAGS.set_default("counterfact", "train")

AXES = {"memit": ("mom2_update_weight", "layer"), "alphaedit": ("nullspace_threshold", "l2")}


def cell_key(method: str, a: float, b: float, n: int) -> dict:
    names = AXES[method]
    return program.cell_key("preset_validation", method=method, n=int(n), **{names[0]: a, names[1]: b})


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).replace(",", " ").split()]


def hparams_of(method: str, a: float, b: float, cfg=None):
    hp = world.hparams_from_flags(method, int(b) if method == "memit" else None, cfg=cfg)
    return hp.replace(mom2_update_weight=a) if method == "memit" else hp.replace(nullspace_threshold=a, l2=b)


def choose(cells: list[dict], before: dict, margin: float) -> dict | None:
    """The cell with the largest S among those with NS >= unedited NS - margin (None if none)."""
    kept = [c for c in cells if c["aggregate"]["ns"] >= before["ns"] - margin]
    return max(kept, key=lambda c: c["aggregate"]["s"], default=None)


def table(records_: list[dict], method: str, margin: float) -> str:
    from jaxedit.eval import intervals

    cells = [r for r in records_ if r.get("type") == "cell" and r["key"]["method"] == method]
    if not cells:
        return ""
    a_name, b_name = AXES[method]
    before = cells[0]["before"]
    chosen = choose(cells, before, margin)
    ids = cells[0]["case_ids"]
    lines = [f"{method} on {len(ids)} validation cases (CounterFact {cells[0]['key']['counterfact']}, ids "
             f"{min(ids)}..{max(ids)}); unedited ES {before['es']:.1f} PS {before['ps']:.1f} NS {before['ns']:.1f}. "
             f"Rule: the largest S with NS >= {before['ns'] - margin:.1f} (unedited NS - {margin:g}; ties: the first "
             "row of the grid). "
             "Bootstrap 95% intervals over cases.", "",
             f"| {a_name} | {b_name} | ES | PS | NS | S | ||dW|| | chosen |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["key"][b_name], c["key"][a_name])):
        iv = intervals.bootstrap(c["cases"])
        mark = "**chosen**" if chosen is not None and c is chosen else ""
        lines.append(f"| {c['key'][a_name]:g} | {c['key'][b_name]:g} | {iv['es']} | {iv['ps']} | {iv['ns']} | "
                     f"{iv['s']} | {c['delta_norm']:.3g} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from jaxedit.editing import editor
    from jaxedit.eval import metrics

    method = FLAGS.method
    if method not in AXES:
        raise ValueError(f"--method must be one of {sorted(AXES)}, got {method!r}")
    grid_a, grid_b = _floats(FLAGS.grid_a), _floats(FLAGS.grid_b)
    program.init_jax()
    cfg, params, tok = world.load_model(FLAGS.model, FLAGS.mesh)
    log = results_log.open_log(FLAGS.out)
    todo = [(a, b) for b in grid_b for a in grid_a if not log.is_finished(cell_key(method, a, b, FLAGS.n))]
    cases = world.load_cases(FLAGS.counterfact, n=FLAGS.n, seed=FLAGS.seed)
    before = records.aggregate_dict(metrics.evaluate(params, cfg, tok, cases, progress=None).aggregate)
    values = {}
    for a, b in tqdm(todo, desc=f"{method} preset validation cells"):
        hp = hparams_of(method, a, b, cfg)
        layer = hp.layers[-1]
        t0 = time.perf_counter()
        cov = world.covariances(params, cfg, tok, list(hp.layers), hp, FLAGS.cache_dir, FLAGS.corpus, progress=False)
        groups = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        if layer not in values:  # the targets do not depend on the solve settings
            values[layer] = editor.edit_values(params, cfg, tok, cases, hp, templates=groups)
        new, report = editor.edit(params, cfg, tok, cases, hp, covariances=cov, templates=groups,
                                  values=values[layer])
        res = metrics.evaluate(new, cfg, tok, cases, progress=None)
        log.append({"type": "cell", "key": cell_key(method, a, b, FLAGS.n), "before": before,
                    "aggregate": records.aggregate_dict(res.aggregate), "cases": records.case_dicts(res.cases),
                    "case_ids": [c.case_id for c in cases], "delta_norm": report.delta_norms[-1],
                    "warnings": list(report.warnings), "seconds": time.perf_counter() - t0})
        logging.info("%s %s=%g %s=%g: %s", method, *AXES[method][:1], a, AXES[method][1], b, res.aggregate)
    text = table(log.records, method, FLAGS.ns_margin)
    out = Path(FLAGS.table) if FLAGS.table else Path(FLAGS.out).with_suffix(f".{method}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    program.run(main)
