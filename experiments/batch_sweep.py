"""Batch-size sweep (Yoon et al. 2024, fig. 3): MEMIT vs EMMET, one batch edit per cell.

Each (method, batch size B) cell edits the first B of one seeded CounterFact selection in a single
batch at one layer, then scores those B cases on the edited model (ES, PS, NS, S, EM, PM, NM); the
same cases are scored before the edit too ("before"). Batches are nested (the 16 cases of B=16 are the
first 16 of B=64), so cells differ only in batch size. Target values do not depend on the method or
on the rest of the batch, so they are optimised once per case and cached on disk.

One JSONL record per finished cell; a restarted run skips finished cells (see experiments.results_log).

  python -m experiments.batch_sweep --batch_sizes=16,64 --methods=memit,emmet --out=runs/batch_sweep.jsonl
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

flags.DEFINE_string("batch_sizes", "16,64,256,1024,4096", "comma-separated batch sizes (paper: 16,...,4096)")
flags.DEFINE_string("methods", "memit,emmet", "comma-separated editors: memit, emmet")
flags.DEFINE_integer("layer", None, "edit layer (default: the model preset's, SmolLM2: 3)")
program.define_common_flags("runs/batch_sweep.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, layer: int, batch_size: int) -> dict:
    return program.cell_key("batch", method=method, layer=int(layer), batch_size=int(batch_size))


def main(argv):
    del argv
    from jaxedit.editing import editor
    from jaxedit.eval import metrics

    plan = sweep_plan.plan_batch_size_sweep(FLAGS, cell_key, "batch sweep", cost=lambda batch_size: batch_size)
    cfg, params, tok, hps, layer, log, todo = (plan.cfg, plan.params, plan.tok, plan.hps, plan.layer, plan.log,
                                               plan.todo)
    if not todo:
        return
    cases = world.load_cases(FLAGS.counterfact, n=max(b for _, b in todo), seed=FLAGS.seed)
    cov = world.covariances(params, cfg, tok, [layer], next(iter(hps.values())), FLAGS.cache_dir, FLAGS.corpus)
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    before_cache: dict[int, dict] = {}
    for method, b in tqdm(todo, desc="batch sweep cells"):
        hp = hps[method]
        batch = cases[:b]
        if len(batch) < b:
            raise ValueError(f"only {len(batch)} cases for batch size {b}")
        t0 = time.perf_counter()
        groups = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        values = stored_values.get(batch, hp, groups)
        t_values = time.perf_counter() - t0
        new, report = editor.edit(params, cfg, tok, batch, hp, covariances=cov, templates=groups, values=values)
        after = metrics.evaluate(new, cfg, tok, batch, progress=None)
        del new
        if b not in before_cache:  # the same cases unedited, per case for paired differences
            unedited = metrics.evaluate(params, cfg, tok, batch)
            before_cache[b] = {"aggregate": records.aggregate_dict(unedited.aggregate),
                               "cases": records.case_dicts(unedited.cases)}
        solve = report.solves[0]
        rec = {"type": "cell", "key": cell_key(method, layer, b), "attempt": results_log.new_attempt(),
               "aggregate": records.aggregate_dict(after.aggregate), "before": before_cache[b]["aggregate"],
               "before_cases": before_cache[b]["cases"],
               "cases": records.case_dicts(after.cases), "delta_norm": report.delta_norms[0],
               "preservation_cond": float(solve.preservation_cond), "system_cond": float(solve.cond),
               "ridge_added": float(solve.ridge_added),
               "hparams": {"mom2_update_weight": hp.mom2_update_weight, "emmet_lambda": hp.emmet_lambda,
                           "v_steps": hp.value.v_num_grad_steps, "cov_samples": hp.covariance.n_samples},
               "values_seconds": t_values, "seconds": time.perf_counter() - t0}
        log.append(rec)
        a = rec["aggregate"]
        logging.info("%s B=%d: ES %.1f PS %.1f NS %.1f S %.1f (%.0fs)", method, b, a["es"] or 0, a["ps"] or 0,
                     a["ns"] or 0, a["s"] or 0, rec["seconds"])


if __name__ == "__main__":
    program.run(main)
