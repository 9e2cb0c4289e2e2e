"""Why do bigger batches edit worse? What the closed-form solve says about each batch, beside what the
batch's edit does to ES, PS and NS.

Each (method, layer, batch size B, batch index i) cell edits cases i*B..(i+1)*B-1 of one seeded
CounterFact selection in one batch at one layer (with --batches_per_size=1, the default, batch 0 of
size B is the first B cases: the batch sweep's nested batches), scores them edited and unedited
(per case, with the paired bootstrap interval of edited − unedited for ES, PS, NS, S), and records
the solve's diagnostics (jaxedit.editing.diagnostics): the preservation cost tr(dW C0 dW^T) /
tr(W C0 W^T), the residual on the batch's own keys, the spectrum of K^T C0^-1 K (smallest eigenvalue,
entropy effective rank, participation ratio, coherence), ||dW||_F and its share in C0's top
eigenvalue directions, and B / d_ff.

For the paraphrase question (does a bigger batch reach a case's other phrasing better?) each cell
also records, per case whose paraphrase names its subject, the paraphrase's key (the down_proj input
at the subject's last token of the bare paraphrase, at the edited layer): the fraction of its C0^-1
norm inside the span of the batch's keys and along its own key alone, and how much of the case's
residual the update writes at it, <dW k_para, r> / ||r||^2 (and at the case's own key). As a control,
the span fraction of paraphrase keys of cases outside every batch (--control_counterfact, another
split): what any phrasing gets from a span of that size.

Target values come from the value cache (shared with the batch and layer sweeps on the same cases).
One JSONL record per finished cell; a restarted run skips finished cells (see experiments.results_log).

  python -m experiments.solve_diagnostics --layers=3,9,15 --batch_sizes=16,32,64,128,256,512,1024,2048 \\
      --methods=memit,emmet --out=runs/solve_diagnostics.jsonl
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import records
from experiments import results_log
from experiments import value_cache
from experiments import world

flags.DEFINE_string("methods", "memit,emmet", "comma-separated editors: memit, emmet")
flags.DEFINE_string("layers", "3,9,15", "comma-separated edit layers (SmolLM2: the preset's 3, 9 the last of "
                    "the layers that edit alike, 15 the middle, where neighbours suffer)")
flags.DEFINE_string("batch_sizes", "16,32,64,128,256,512,1024,2048", "comma-separated batch sizes")
flags.DEFINE_integer("batches_per_size", 1, "disjoint batches per batch size, as many as the selection holds "
                     "(1: the first B cases only, the batch sweep's nested batches)")
flags.DEFINE_integer("selection_size", None, "size of the seeded CounterFact selection the batches are cut from "
                     "(default: the largest batch size)")
flags.DEFINE_string("top_fractions", "0.01,0.1", "fractions of d_ff whose top C0 eigenvectors' share of "
                    "||dW||_F^2 is recorded")
flags.DEFINE_string("control_counterfact", "train", "CounterFact source of the control paraphrases (cases outside "
                    "every batch; 'train' is disjoint from 'edit')")
flags.DEFINE_integer("n_control", 64, "control paraphrases")
flags.DEFINE_integer("paired_resamples", 1000, "bootstrap resamples for each paired interval")
program.define_common_flags("runs/solve_diagnostics.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, layer: int, batch_size: int, batch_index: int, selection: int) -> dict:
    return program.cell_key("solve_diagnostics", method=method, layer=int(layer), batch_size=int(batch_size),
                            batch_index=int(batch_index), selection=int(selection))


def batches_of(sizes, per_size: int, selection: int) -> list[tuple[int, int]]:
    """(batch size, batch index) of every batch: per size, min(per_size, selection // size) disjoint ones."""
    if per_size < 1:
        raise ValueError(f"--batches_per_size must be >= 1, got {per_size}")
    out = []
    for b in sizes:
        if b > selection:
            raise ValueError(f"batch size {b} is larger than the selection ({selection} cases)")
        out += [(b, i) for i in range(min(per_size, selection // b))]
    return out


def paraphrase_requests(cases) -> tuple[list[int], list]:
    """(indices of the cases, EditRequests) for each case whose first paraphrase names its subject:
    the paraphrase as a prompt with the subject's slot, so its key is read as an edit key is."""
    from jaxedit.requests import EditRequest

    index, requests = [], []
    for i, c in enumerate(cases):
        if not c.paraphrase_prompts or c.subject not in c.paraphrase_prompts[0]:
            continue
        try:
            requests.append(EditRequest(c.paraphrase_prompts[0].replace(c.subject, "{}", 1), c.subject, c.target_new,
                                        case_id=c.case_id))
        except ValueError:  # e.g. braces of its own in the text
            continue
        index.append(i)
    return index, requests


def paraphrase_keys(params, cfg, tok, cases, layer: int):
    """(indices, (F, m) keys) of the cases' bare paraphrases at `layer` (see paraphrase_requests)."""
    from jaxedit.editing.keys import keys_at_layers

    index, requests = paraphrase_requests(cases)
    if not requests:
        return index, np.zeros((cfg.intermediate_size, 0), np.float32)
    return index, np.asarray(keys_at_layers(params, cfg, tok, requests, (("{}",),), [layer])[0].T)


def paraphrase_record(params, cfg, tok, batch, layer, K, R, dW, eigen, control_keys) -> dict:
    """Per case with a usable paraphrase: span and own-key fractions of its key, and the share of its
    residual the update writes at the paraphrase key and at its own key; the control keys' span fractions."""
    from jaxedit.editing import diagnostics

    index, P = paraphrase_keys(params, cfg, tok, batch, layer)
    K, R, dW = (np.asarray(x, np.float64) for x in (K, R, dW))
    out = {"skipped": len(batch) - len(index), "cases": []}
    if index:
        span = diagnostics.span_fraction(None, K, P, eigen=eigen)
        own = diagnostics.own_key_fraction(None, K[:, index], P, eigen=eigen)
        r = R[:, index]
        rr = np.sum(r * r, axis=0)
        at_para = np.sum((dW @ P) * r, axis=0) / rr
        at_own = np.sum((dW @ K[:, index]) * r, axis=0) / rr
        out["cases"] = [{"case_id": batch[i].case_id, "span_fraction": float(s), "own_fraction": float(o),
                         "transfer": float(t), "own_transfer": float(u)}
                        for i, s, o, t, u in zip(index, span, own, at_para, at_own)]
    out["control_span_fraction"] = ([float(x) for x in diagnostics.span_fraction(None, K, control_keys, eigen=eigen)]
                                    if control_keys.shape[1] else [])
    return out


def paired_dict(after_cases, before_cases, n_resamples: int) -> dict:
    """{metric: [estimate, low, high]} of edited − unedited on the same cases (bootstrap 95%)."""
    from jaxedit.eval import intervals

    diff = intervals.paired_difference(after_cases, before_cases, n_resamples=n_resamples, seed=0)
    return {m: [diff[m].estimate, diff[m].low, diff[m].high] for m in ("es", "ps", "ns", "s", "em", "pm", "nm")}


def main(argv):
    del argv
    from jaxedit.distributed import to_host
    from jaxedit.editing import diagnostics, editor, pm
    from jaxedit.editing.keys import outputs_at_subject
    from jaxedit.editing.null_space import preservation_null_spaces
    from jaxedit.eval import metrics

    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    layers = program.parse_int_list(FLAGS.layers)
    sizes = sorted(program.parse_int_list(FLAGS.batch_sizes))
    fractions = tuple(float(x) for x in FLAGS.top_fractions.split(","))
    diagnostics.top_counts(1, fractions)  # refuses fractions outside (0, 1] before the model loads
    selection = FLAGS.selection_size or max(sizes)
    batches = batches_of(sizes, FLAGS.batches_per_size, selection)
    program.init_jax()
    log = results_log.open_log(FLAGS.out)
    cells = [(m, l, b, i) for l in layers for b, i in batches for m in methods]
    todo = [c for c in cells if not log.is_finished(cell_key(*c, selection))]
    logging.info("solve diagnostics: %d cells, %d done, %d to run -> %s", len(cells), len(cells) - len(todo),
                 len(todo), FLAGS.out)
    if not todo:
        return
    cfg, params, tok = world.load_model(FLAGS.model, FLAGS.mesh)
    bad = [l for l in layers if not 0 <= l < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"--layers {bad}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    cases = world.load_cases(FLAGS.counterfact, n=selection, seed=FLAGS.seed)
    control = world.load_cases(FLAGS.control_counterfact, n=FLAGS.n_control, seed=FLAGS.seed) if FLAGS.n_control else ()
    hp_of = {(m, l): world.hparams_from_flags(m, l, cfg=cfg) for m in methods for l in layers}
    groups = {m: world.templates(params, cfg, tok, hp_of[m, layers[0]], FLAGS.cache_dir) for m in methods}
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    used = max((i + 1) * b for _, _, b, i in todo)
    unedited = records.case_dicts(metrics.evaluate(params, cfg, tok, cases[:used], progress=False).cases)
    per_layer: dict = {}
    values_of: dict = {}
    for method, layer, b, i in tqdm(todo, desc="solve diagnostics cells"):
        hp = hp_of[method, layer]
        if (method, layer) not in values_of:  # every case's value at once: one compiled value loop, full chunks
            values_of = {k: v for k, v in values_of.items() if k[1] == layer}
            values_of[method, layer] = stored_values.get(cases[:used], hp, groups[method])
        if per_layer.get("layer") != layer:  # C0, its factor, eigendecomposition and control keys, once per layer
            cov = world.covariances(params, cfg, tok, [layer], hp, FLAGS.cache_dir, FLAGS.corpus)[layer]
            space = preservation_null_spaces({layer: cov}, 1.0, cache_dir=Path(FLAGS.cache_dir) / "null_space")[layer]
            per_layer = {"layer": layer, "cov": cov, "factors": {},
                         "eigen": (np.asarray(space.eigenvalues), np.asarray(space.eigenvectors)),
                         "control": (paraphrase_keys(params, cfg, tok, control, layer)[1] if control
                                     else np.zeros((cfg.intermediate_size, 0), np.float32))}
        shift = hp.preservation_shift
        if shift not in per_layer["factors"]:
            per_layer["factors"][shift] = pm.factor_preservation(per_layer["cov"], shift=shift)
        factor = per_layer["factors"][shift]
        batch = cases[i * b:(i + 1) * b]
        t0 = time.perf_counter()
        values = values_of[method, layer].select(slice(i * b, (i + 1) * b))
        new, report = editor.edit(params, cfg, tok, batch, hp, covariances={layer: factor}, templates=groups[method],
                                  values=values)
        t_edit = time.perf_counter()
        # The solve's own inputs: K as written, R = target - current output (one layer: all of it), and
        # its dW (the same solve again, rather than W' - W rounded by float32 storage).
        K = report.keys[0]
        current = outputs_at_subject(params, cfg, tok, batch, layer)[1]
        R = (values.target - current).T
        dW, _ = editor.layer_update(hp, factor, K, R)
        W = params["layers"]["down_proj"][layer]
        diag = diagnostics.solve_diagnostics(None, W, K, R, dW, top_fractions=fractions, eigen=per_layer["eigen"])
        para = paraphrase_record(params, cfg, tok, batch, layer, to_host(K), to_host(R), to_host(dW),
                                 per_layer["eigen"], per_layer["control"])
        t_diag = time.perf_counter()
        after = records.case_dicts(metrics.evaluate(new, cfg, tok, batch, progress=False).cases)
        del new
        before = unedited[i * b:(i + 1) * b]
        rec = {"type": "cell", "key": cell_key(method, layer, b, i, selection), "attempt": results_log.new_attempt(),
               "diagnostics": diag.as_dict(), "d_ff": cfg.intermediate_size, "batch_per_d_ff": b / cfg.intermediate_size,
               "aggregate": records.aggregate_cases(after), "cases": after,
               "before": records.aggregate_cases(before), "before_cases": before,
               "paired": paired_dict(after, before, FLAGS.paired_resamples), "paraphrase": para,
               "delta_norm": report.delta_norms[0], "system_cond": float(report.solves[0].cond),
               "ridge_added": float(report.solves[0].ridge_added), "warnings": list(report.warnings),
               "hparams": {"mom2_update_weight": hp.mom2_update_weight, "emmet_lambda": hp.emmet_lambda,
                           "v_steps": hp.value.v_num_grad_steps, "cov_samples": hp.covariance.n_samples},
               "diagnostics_seconds": t_diag - t_edit,
               "seconds": time.perf_counter() - t0}
        log.append(rec)
        p = rec["paired"]
        logging.info("%s L%d B=%d #%d: dNS %+.1f dPS %+.1f ES %.1f; cost %.3g residual %.3g min eig %.3g "
                     "erank %.1f (%.0fs)", method, layer, b, i, p["ns"][0], p["ps"][0], rec["aggregate"]["es"] or 0,
                     diag.preservation_cost, diag.residual, diag.gram_min_eigenvalue, diag.effective_rank,
                     rec["seconds"])


if __name__ == "__main__":
    program.run(main)
