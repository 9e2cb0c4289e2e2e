"""Sequential-batched sweep (Yoon et al. 2024, figs 4-6): MEMIT, EMMET (and AlphaEdit) applying --total
edits in batches of B, one batch after another on the already-edited model. AlphaEdit carries the keys
of earlier batches by itself (jaxedit.methods.Method.keeps_previous_keys).

Two kinds of metrics, both recorded and labelled:
  * "after_batch": right after each batch, on that batch's cases only (one "type": "batch" record per
    batch, with the number of edits made so far);
  * "final_all": after the last batch, over all --total cases (in the cell's final "type": "cell"
    record, together with "after_batch_mean", the aggregate of every batch's after-batch scores).
B = --total is one batch of the same total (the baseline sequential-batched editing is compared with).
Each cell also records "before": the same cases scored on the unedited model. The first batch of every
cell edits the unedited model, so its values come from the value cache (--value_cache): computed once,
shared by every method and by the layer and batch sweeps' cells of the same cases.

Resuming: a cell counts as finished only once its "cell" record is written. A cell interrupted
mid-way is recomputed from scratch on restart, under a new attempt id; its earlier per-batch records
stay in the file but belong to an attempt without a final record, so experiments.summarize (which
keeps, per cell, the batch records of the attempt of its last "cell" record) never counts them.

  python -m experiments.sequential_sweep --batch_sizes=1,4,16 --total=16 --out=runs/sequential_sweep.jsonl
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

flags.DEFINE_string("batch_sizes", "1,64,256,1024,4096", "comma-separated batch sizes (paper: 1,...,4096)")
flags.DEFINE_string("methods", "memit,emmet", "comma-separated editors: memit, emmet, alphaedit (rome: batch "
                    "size 1)")
flags.DEFINE_integer("total", 4096, "edits per cell (the paper: 4096; a multiple of every batch size is best)")
flags.DEFINE_integer("layer", None, "edit layer (default: the model preset's, SmolLM2: 3)")
flags.DEFINE_boolean("preserve_previous_edits", False, "add earlier batches' keys to the preservation term "
                     "(C0 + K_prev K_prev^T / lambda); the paper does not")
program.define_common_flags("runs/sequential_sweep.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, layer: int, batch_size: int) -> dict:
    return program.cell_key("sequential", method=method, layer=int(layer), batch_size=int(batch_size),
                            total=FLAGS.total, preserve_previous_edits=FLAGS.preserve_previous_edits)


def run_cell(params, cfg, tok, cases, hp, cov, groups, batch_size: int, log: results_log.ResultsLog, key: dict,
             before, stored_values: value_cache.ValueCache):
    from jaxedit.eval import metrics
    from jaxedit.editing import schedule

    attempt = results_log.new_attempt()
    t0 = time.perf_counter()
    rows: list[dict] = []

    def after_batch(index, new_params, batch, report):
        res = metrics.evaluate(new_params, cfg, tok, batch, progress=False)
        cases_ = records.case_dicts(res.cases)
        rows.extend(cases_)
        log.append({"type": "batch", "key": key, "attempt": attempt, "batch_index": index,
                    "edits_so_far": min((index + 1) * batch_size, len(cases)), "batch_cases": len(batch),
                    "after_batch": records.aggregate_dict(res.aggregate), "cases": cases_,
                    "delta_norm": report.delta_norms[0], "seconds": time.perf_counter() - t0})

    # The first batch edits the unedited model: its values are shared with the other methods' cells
    # (and any other sweep of these cases) through the value cache.
    first = stored_values.get(cases[:batch_size], hp, groups)
    final, _ = schedule.sequential_batched_edit(
        params, cfg, tok, cases, hp, covariances=cov, templates=groups, batch_size=batch_size,
        preserve_previous_edits=FLAGS.preserve_previous_edits, after_batch=after_batch, first_values=first)
    res = metrics.evaluate(final, cfg, tok, cases, progress=None)
    log.append({"type": "cell", "key": key, "attempt": attempt, "n_batches": -(-len(cases) // batch_size),
                "final_all": records.aggregate_dict(res.aggregate), "final_cases": records.case_dicts(res.cases),
                "after_batch_mean": records.aggregate_cases(rows), "before": records.aggregate_dict(before.aggregate),
                "before_cases": records.case_dicts(before.cases),
                "hparams": {"mom2_update_weight": hp.mom2_update_weight, "emmet_lambda": hp.emmet_lambda,
                            **({"nullspace_threshold": hp.nullspace_threshold, "l2": hp.l2}
                               if hp.spec.uses_null_space else {}),
                            "v_steps": hp.value.v_num_grad_steps, "cov_samples": hp.covariance.n_samples},
                "seconds": time.perf_counter() - t0})
    return res.aggregate


def main(argv):
    del argv
    plan = sweep_plan.plan_batch_size_sweep(FLAGS, cell_key, "sequential-batched sweep",
                                        f", {FLAGS.total} edits per cell")
    cfg, params, tok, hps, layer, log, todo = (plan.cfg, plan.params, plan.tok, plan.hps, plan.layer, plan.log,
                                               plan.todo)
    if not todo:
        return
    cases = world.load_cases(FLAGS.counterfact, n=FLAGS.total, seed=FLAGS.seed)
    cov = world.covariances(params, cfg, tok, [layer], next(iter(hps.values())), FLAGS.cache_dir, FLAGS.corpus)
    from jaxedit.eval import metrics

    before = metrics.evaluate(params, cfg, tok, cases, progress=None)  # the same cases unedited
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    for method, b in tqdm(todo, desc="sequential sweep cells"):
        hp = hps[method]
        groups = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        agg = run_cell(params, cfg, tok, cases, hp, cov, groups, b, log, cell_key(method, layer, b), before,
                       stored_values)
        logging.info("%s B=%d, %d edits: final ES %.1f PS %.1f NS %.1f S %.1f", method, b, len(cases), agg.es,
                     agg.ps, agg.ns, agg.s)


if __name__ == "__main__":
    program.run(main)
