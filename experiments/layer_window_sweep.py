"""How many layers should one batch edit spread over? MEMIT and EMMET over windows of consecutive layers.

Each (method, batch size B, start layer s, window w) cell edits the first B cases of one seeded
CounterFact selection in one batch spread over layers s..s+w-1 (the residual divided over the layers
still to edit, keys recomputed after each layer's update; jaxedit.editing.editor.edit), then scores
those B cases (ES, PS, NS, S and the margins; per case, so that the summary pairs every window with the
one-layer edit at s, window 1, on the same cases). The same cases are scored unedited once. The
target values live at the window's last layer and are read from the value cache (a window ending at
layer l shares them with the one-layer edit at l and with the other sweeps' edits at l). Each record
carries the update's norm at every layer of its window.

One JSONL record per finished cell; a restarted run skips finished cells (see experiments.results_log).

  python -m experiments.layer_window_sweep --starts=0,1,2,3,middle --windows=1,2,3,5,8 --batch_sizes=64,256 \\
      --methods=memit,emmet --out=runs/layer_window_sweep.jsonl
"""
from __future__ import annotations

import logging
import time

from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import records
from experiments import results_log
from experiments import value_cache
from experiments import world

flags.DEFINE_string("methods", "memit,emmet", "comma-separated editors: memit, emmet")
flags.DEFINE_string("starts", "0,1,2,3,middle", "comma-separated first layers of the windows ('middle': the "
                    "model's middle layer, L // 2)")
flags.DEFINE_string("windows", "1,2,3,5,8", "comma-separated window lengths (consecutive layers from each start)")
flags.DEFINE_string("batch_sizes", "64,256", "comma-separated batch sizes (the first B of one selection)")
flags.DEFINE_integer("selection_size", None, "size of the seeded CounterFact selection whose first B cases "
                     "form a batch (default: the largest batch size; give the batch sweep's largest batch size "
                     "to edit its cases and reuse its cached values)")
program.define_common_flags("runs/layer_window_sweep.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, start: int, window: int, batch_size: int, selection: int) -> dict:
    return program.cell_key("layer_window", method=method, start=int(start), window=int(window),
                            batch_size=int(batch_size), selection=int(selection))


def parse_starts(text: str, num_layers: int) -> list[int]:
    """--starts: layer indices and 'middle' (num_layers // 2), in order, duplicates dropped."""
    out = []
    for part in str(text).replace(",", " ").split():
        layer = num_layers // 2 if part == "middle" else int(part)
        if layer not in out:
            out.append(layer)
    return out


def windows_of(starts, windows, num_layers: int) -> list[tuple[int, ...]]:
    """The (start, ..., start + w - 1) layer windows; one past the model's last layer is refused."""
    out = []
    for s in starts:
        for w in windows:
            if w < 1:
                raise ValueError(f"--windows: a window has at least one layer, got {w}")
            if s < 0 or s + w > num_layers:
                raise ValueError(f"the window of {w} layers from layer {s} ends past the model's last layer "
                                 f"({num_layers - 1}): shorten --windows or move --starts")
            out.append(tuple(range(s, s + w)))
    return out


def main(argv):
    del argv
    from jaxedit.editing import editor, pm
    from jaxedit.eval import metrics

    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    sizes = sorted(program.parse_int_list(FLAGS.batch_sizes))
    program.init_jax()
    cfg, params, tok = world.load_model(FLAGS.model, FLAGS.mesh)
    L = cfg.num_hidden_layers
    windows = windows_of(parse_starts(FLAGS.starts, L), program.parse_int_list(FLAGS.windows), L)
    selection = FLAGS.selection_size or max(sizes)
    if selection < max(sizes):
        raise ValueError(f"--selection_size={selection} is smaller than the largest batch size {max(sizes)}")
    log = results_log.open_log(FLAGS.out)
    # The one-layer edit of each start first: every longer window is read against it.
    cells = [(m, b, layers) for b in sizes for layers in sorted(windows, key=lambda w: (w[0], len(w)))
             for m in methods]
    todo = [c for c in cells if not log.is_finished(cell_key(c[0], c[2][0], len(c[2]), c[1], selection))]
    logging.info("layer window sweep: %d cells, %d done, %d to run -> %s", len(cells), len(cells) - len(todo),
                 len(todo), FLAGS.out)
    if not todo:
        return
    cases = world.load_cases(FLAGS.counterfact, n=selection, seed=FLAGS.seed)
    hp_of = {m: world.hparams_from_flags(m, cfg=cfg) for m in methods}
    needed = sorted({l for _, _, layers in todo for l in layers})
    cov = world.covariances(params, cfg, tok, needed, hp_of[methods[0]], FLAGS.cache_dir, FLAGS.corpus)
    factors: dict[tuple[int, float], pm.Preservation] = {}  # by (layer, shift)
    groups = {m: world.templates(params, cfg, tok, hp_of[m], FLAGS.cache_dir) for m in methods}
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    unedited = records.case_dicts(metrics.evaluate(params, cfg, tok, cases[:max(b for _, b, _ in todo)],
                                                   progress=False).cases)
    largest = max(b for _, b, _ in todo)
    values_of: dict = {}
    for method, b, layers in tqdm(todo, desc="layer window cells"):
        hp = hp_of[method].replace(layers=layers)
        for l in layers:  # factor each layer's C0 once for all cells
            if (l, hp.preservation_shift) not in factors:
                factors[l, hp.preservation_shift] = pm.factor_preservation(cov[l], shift=hp.preservation_shift)
        batch = cases[:b]
        t0 = time.perf_counter()
        if (method, layers[-1]) not in values_of:  # the largest batch's values at once, then its first b
            values_of[method, layers[-1]] = stored_values.get(cases[:largest], hp, groups[method])
        values = values_of[method, layers[-1]].select(slice(0, b))
        t_values = time.perf_counter() - t0
        new, report = editor.edit(params, cfg, tok, batch, hp, covariances={l: factors[l, hp.preservation_shift] for l in layers},
                                  templates=groups[method], values=values)
        after = metrics.evaluate(new, cfg, tok, batch, progress=False)
        del new
        rec = {"type": "cell", "key": cell_key(method, layers[0], len(layers), b, selection),
               "attempt": results_log.new_attempt(), "layers": list(layers),
               "aggregate": records.aggregate_dict(after.aggregate), "cases": records.case_dicts(after.cases),
               "before": records.aggregate_cases(unedited[:b]), "before_cases": unedited[:b],
               "delta_norms": {str(l): n for l, n in zip(layers, report.delta_norms)},
               "system_cond": [float(s.cond) for s in report.solves],
               "ridge_added": [float(s.ridge_added) for s in report.solves],
               "warnings": list(report.warnings), "repairs": list(report.repairs),
               "hparams": {"mom2_update_weight": hp.mom2_update_weight, "emmet_lambda": hp.emmet_lambda,
                           "v_steps": hp.value.v_num_grad_steps, "cov_samples": hp.covariance.n_samples},
               "values_seconds": t_values, "seconds": time.perf_counter() - t0}
        log.append(rec)
        a = rec["aggregate"]
        logging.info("%s B=%d layers %d-%d: ES %.1f PS %.1f NS %.1f S %.1f EM %.1f (%.0fs)", method, b, layers[0],
                     layers[-1], a["es"] or 0, a["ps"] or 0, a["ns"] or 0, a["s"] or 0, a["em"] or 0, rec["seconds"])


if __name__ == "__main__":
    program.run(main)
