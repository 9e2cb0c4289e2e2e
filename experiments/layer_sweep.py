"""Layer sweep (Yoon et al. 2024, figs 1-2): which layer edits best?

For every (method, layer) cell, N single edits are made, each on the unedited model (the editors are
pure, so the model is "restored" between edits by construction), and each is scored on its own edited
model; the cell's metrics are the aggregate (ES, PS, NS, S, EM, PM, NM) over the N cases. The N
target values of a cell are optimised together in one batched call (they are independent) and cached
on disk, then each edit applies its own value. The N edited models are not materialised for scoring:
each edit's down_proj change has rank 1, and all N cases are scored in one pass on the unedited
model, each under its own change (jaxedit.eval.independent; --scoring=per_model scores one
materialised model at a time, with the same numbers). Each record carries its seconds per stage.

One JSONL record per finished cell; a restarted run skips finished cells (see experiments.results_log).

  python -m experiments.layer_sweep --layers=0,2,4 --methods=memit,rome --n=8 --n_rome=4 \\
      --out=runs/layer_sweep.jsonl
"""
from __future__ import annotations

import logging
import time

from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import records
from experiments import results_log
from experiments import sweep_plan
from experiments import value_cache
from experiments import world

flags.DEFINE_string("layers", "all", "comma-separated layers to edit, or 'all'")
flags.DEFINE_string("methods", "memit,rome", "comma-separated editors: rome, memit, emmet")
flags.DEFINE_integer("n", 8, "single edits per cell")
flags.DEFINE_enum("scoring", "one_pass", ["one_pass", "per_model"], "score each cell's edits in one pass "
                  "on the unedited model (low-rank changes) or on one materialised model per edit")
flags.DEFINE_integer("n_rome", None, "single edits per ROME cell (default --n): the first n_rome of the "
                     "max(n, n_rome) cases selected with --seed")
program.define_common_flags("runs/layer_sweep.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, layer: int, n: int) -> dict:
    return program.cell_key("layer", method=method, layer=int(layer), n=int(n))


def run_cell(params, cfg, tok, cases, hp, cov, groups, stored_values, scoring: str = "one_pass") -> dict:
    """N single edits at hp.layers[0], each scored on its own edited model.

    scoring="one_pass": every edit's down_proj change is kept as its rank-1 factors and all N cases
    are scored together on the unedited model, each under its own change (metrics.evaluate(edits=));
    "per_model": each edited model is materialised and scored alone (the same numbers, slower).
    Stage seconds: values (batched, or read from the value cache), solve (keys and the PM solve of
    each edit), scoring.
    """
    from jaxedit.editing import editor
    from jaxedit.eval import independent, metrics

    if scoring not in ("one_pass", "per_model"):
        raise ValueError(f"scoring={scoring!r}: one_pass or per_model")
    t0 = time.perf_counter()
    values = stored_values.get(cases, hp, groups)
    t_values = time.perf_counter() - t0
    t_score = 0.0
    changes, alone, norms = [], [], []
    for i, case in enumerate(tqdm(cases, desc=f"{hp.method} L{hp.layers[0]} edits", leave=False)):
        new, report = editor.edit(params, cfg, tok, [case], hp, covariances=cov, templates=groups,
                                  values=value_cache.slice_values(values, i))
        norms.append(report.delta_norms[0])
        if scoring == "one_pass":
            changes.append(independent.change_of(params, new, hp.layers, rank=1))
        else:
            t1 = time.perf_counter()
            alone += metrics.evaluate(new, cfg, tok, [case], batch_size=8, progress=False).cases
            t_score += time.perf_counter() - t1
        del new
    t1 = time.perf_counter()
    if scoring == "one_pass":
        alone = metrics.evaluate(params, cfg, tok, cases, batch_size=8, progress=False,
                                 edits=independent.stack_changes(changes)).cases
    t_score += time.perf_counter() - t1
    rows = records.case_dicts(alone)
    total = time.perf_counter() - t0
    return {"aggregate": records.aggregate_cases(rows), "cases": rows, "delta_norms": norms,
            "value_loss": [float(x) for x in values.loss], "seconds": total, "values_seconds": t_values,
            "stage_seconds": {"values": t_values, "solve": total - t_values - t_score, "scoring": t_score},
            "scoring": scoring}


def main(argv):
    del argv
    import jax.numpy as jnp
    from jaxedit.editing import pm

    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    program.init_jax(cells_per_process=True)
    cfg, params, tok = world.load_model(FLAGS.model, FLAGS.mesh)
    layers = (list(range(cfg.num_hidden_layers)) if FLAGS.layers == "all" else program.parse_int_list(FLAGS.layers))
    n_of = {m: (FLAGS.n_rome if (m == "rome" and FLAGS.n_rome) else FLAGS.n) for m in methods}
    log = results_log.open_log(FLAGS.out, program.process_share())
    # With --cell_parallelism=per_process, a process runs whole layers (C0 and its factor are per
    # layer); a cell's work is mostly its value loop, which runs the layers from the edited one on.
    mine = sweep_plan.cells_of_this_process([(m, l) for l in layers for m in methods], group=lambda c: c[1],
                                            cost=lambda c: n_of[c[0]] * (cfg.num_hidden_layers - c[1]))
    todo = [(m, l) for m, l in mine if not log.is_finished(cell_key(m, l, n_of[m]))]
    logging.info("layer sweep: %d cells, %d already done, %d to run -> %s",
                 len(mine), len(mine) - len(todo), len(todo), FLAGS.out)
    if not todo:
        return
    # One seeded selection of max(--n, --n_rome) cases whatever --methods is; a cell of n edits uses its
    # first n, so runs with different --methods share cases.
    cases = world.load_cases(FLAGS.counterfact, n=max(FLAGS.n, FLAGS.n_rome or 0), seed=FLAGS.seed)
    hp0 = world.hparams_from_flags(methods[0], cfg=cfg)
    cov = world.covariances(params, cfg, tok, sorted({l for _, l in todo}), hp0, FLAGS.cache_dir, FLAGS.corpus)
    groups = {m: world.templates(params, cfg, tok, world.hparams_from_flags(m, cfg=cfg), FLAGS.cache_dir) for m in methods}
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    from jaxedit.eval import metrics

    # the same cases unedited, per case: each cell's paired difference edited - unedited
    unedited = records.case_dicts(metrics.evaluate(params, cfg, tok, cases, progress=False).cases)
    factors = {}
    for method, layer in tqdm(todo, desc="layer sweep cells"):
        hp = world.hparams_from_flags(method, layer, cfg=cfg)
        n = n_of[method]
        if layer not in factors:  # factor C0 once per layer, not once per edit
            factors = {layer: pm.factor_preservation(jnp.asarray(cov[layer]))}
        out = run_cell(params, cfg, tok, cases[:n], hp, factors, groups[method], stored_values, FLAGS.scoring)
        a = out["aggregate"]
        log.append({"type": "cell", "key": cell_key(method, layer, n), "attempt": results_log.new_attempt(),
                    "hparams": {"mom2_update_weight": hp.mom2_update_weight, "v_steps": hp.value.v_num_grad_steps,
                                "cov_samples": hp.covariance.n_samples}, **out,
                    "before_cases": unedited[:n]})
        logging.info("%s layer %d: ES %.1f PS %.1f NS %.1f S %.1f (%.0fs)", method, layer, a["es"] or 0,
                     a["ps"] or 0, a["ns"] or 0, a["s"] or 0, out["seconds"])


if __name__ == "__main__":
    program.run(main)
