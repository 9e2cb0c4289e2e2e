"""Lifelong editing: thousands of sequential edits with the model's general ability watched.

Each cell (method, batch size, ENCORE options) applies --total CounterFact edits in batches of B, one
batch after another on the already-edited model. Every --monitor_every edits (and after the last
batch) a jaxedit.eval.monitor.Monitor measures held-out perplexity, general-ability accuracy, generation
entropy, the edited layer's ||W - W0|| / ||W0|| and retention (ES, the efficacy margin and NS over every
case edited so far); a CollapseRule stops the cell at the first collapsed measurement and records
where. Counts are reported both as edits and as edits per d_ff (the key space an edit writes into).

Resuming mid-way: the run's state (the edited layer's down_proj, carried keys, the measurements so far)
is checkpointed after every batch under --cache_dir/lifelong (jaxedit.editing.run_state). A killed
cell resumes at its last finished batch; a batch's record is written once (its attempt is the run's
identity, and a batch already recorded under it is not written again).

  python -m experiments.lifelong --methods=memit,emmet,alphaedit --batch_sizes=16,64,256,1024 --total=1024 \\
      --monitor_every=64 --out=experiments/results/raw/lifelong.jsonl
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import results_log
from experiments import sweep_plan
from experiments import value_cache
from experiments import world

flags.DEFINE_string("batch_sizes", "16,64,256,1024", "comma-separated batch sizes")
flags.DEFINE_string("methods", "memit,emmet,alphaedit", "comma-separated editors: memit, emmet, alphaedit")
flags.DEFINE_integer("total", 1024, "edits per cell")
flags.DEFINE_integer("layer", None, "edit layer (default: the model preset's, SmolLM2: 3)")
flags.DEFINE_integer("monitor_every", 64, "edits between measurements of general ability and retention")
flags.DEFINE_boolean("most_probable_stop", False, "ENCORE's most-probable early stopping in the value loop")
flags.DEFINE_float("norm_constraint", 0.0, "ENCORE's Frobenius-norm constraint weight on the update (0: none)")
flags.DEFINE_integer("monitor_questions", 100, "general-ability questions per task")
flags.DEFINE_integer("monitor_tokens", 16384, "held-out WikiText-103 test tokens scored for perplexity")
flags.DEFINE_integer("monitor_generations", 32, "CounterFact generation prompts sampled for entropy (0: none)")
flags.DEFINE_float("collapse_perplexity_ratio", 2.0, "collapse when perplexity exceeds this x unedited (0: off)")
flags.DEFINE_float("collapse_accuracy_margin", 0.0, "collapse when mean general accuracy <= chance + this "
                   "(points; negative: off)")
program.define_common_flags("runs/lifelong.jsonl")
FLAGS = flags.FLAGS


def cell_key(method: str, layer: int, batch_size: int) -> dict:
    return program.cell_key("lifelong", method=method, layer=int(layer), batch_size=int(batch_size),
                            total=FLAGS.total, most_probable_stop=FLAGS.most_probable_stop,
                            norm_constraint=FLAGS.norm_constraint, monitor_every=FLAGS.monitor_every)


def encore_options(hp):
    """The cell's hparams with the ENCORE flags applied."""
    import dataclasses

    value = dataclasses.replace(hp.value, most_probable_stop=FLAGS.most_probable_stop)
    return hp.replace(value=value, norm_constraint=FLAGS.norm_constraint)


def measures_after(index: int, batch_size: int, total: int, every: int) -> bool:
    """Whether the batch `index` ends at or past a multiple of `every` edits, or is the last."""
    done = min((index + 1) * batch_size, total)
    return done == total or done // every > (done - batch_size) // every


def run_cell(params, cfg, tok, cases, hp, cov, groups, batch_size: int, log: results_log.ResultsLog, key: dict,
             monitor, rule, stored_values: value_cache.ValueCache, checkpoint_dir: Path):
    from jaxedit.editing import run_state, schedule

    attempt = run_state.run_identity(params, cfg, cases, hp, batch_size, False)
    recorded = {r["batch_index"] for r in log.records
                if r.get("type") == "batch" and r.get("attempt") == attempt and r.get("key") == key}
    t0 = time.perf_counter()
    f = cfg.intermediate_size

    def after_batch(index, new_params, batch, report):
        done = min((index + 1) * batch_size, len(cases))
        row = {"batch_index": index, "edits_so_far": done, "edits_per_dff": done / f,
               "delta_norm": report.delta_norms[0], "value_steps": float(report.values.steps.mean()),
               "value_seconds": report.seconds["values"], "seconds": time.perf_counter() - t0}
        stop = None
        if measures_after(index, batch_size, len(cases), FLAGS.monitor_every):
            row["monitor"] = monitor.measure(new_params, cases[:done])
            stop = rule.reason(monitor.unedited, row["monitor"])
            row["stopped"] = stop
        if index not in recorded:
            log.append({"type": "batch", "key": key, "attempt": attempt, **row})
        return schedule.StopEditing(stop, row) if stop else row

    first = stored_values.get(cases[:batch_size], hp, groups)
    _, outcomes = schedule.sequential_batched_edit(
        params, cfg, tok, cases, hp, covariances=cov, templates=groups, batch_size=batch_size,
        after_batch=after_batch, first_values=first, checkpoint_dir=checkpoint_dir)
    last = outcomes[-1]
    log.append({"type": "cell", "key": key, "attempt": attempt, "n_batches": len(outcomes),
                "edits": min(len(outcomes) * batch_size, len(cases)), "stopped": last.stopped,
                "unedited": monitor.unedited, "final": last.extra.get("monitor"),
                "d_ff": f, "hparams": {"mom2_update_weight": hp.mom2_update_weight, "emmet_lambda": hp.emmet_lambda,
                                       "norm_constraint": hp.norm_constraint,
                                       "most_probable_stop": hp.value.most_probable_stop,
                                       **({"nullspace_threshold": hp.nullspace_threshold, "l2": hp.l2}
                                          if hp.spec.uses_null_space else {}),
                                       "v_steps": hp.value.v_num_grad_steps, "cov_samples": hp.covariance.n_samples},
                "seconds": time.perf_counter() - t0})
    return last


def main(argv):
    del argv
    from jaxedit.eval.monitor import CollapseRule, Monitor, MonitorSpec

    plan = sweep_plan.plan_batch_size_sweep(FLAGS, cell_key, "lifelong editing", f", {FLAGS.total} edits per cell")
    cfg, params, tok, layer, log, todo = plan.cfg, plan.params, plan.tok, plan.layer, plan.log, plan.todo
    if not todo:
        return
    hps = {m: encore_options(hp) for m, hp in plan.hps.items()}
    cases = world.load_cases(FLAGS.counterfact, n=FLAGS.total, seed=FLAGS.seed)
    cov = world.covariances(params, cfg, tok, [layer], next(iter(hps.values())), FLAGS.cache_dir, FLAGS.corpus)
    tiny = FLAGS.model == program.TINY
    spec = MonitorSpec(every=FLAGS.monitor_every, questions=FLAGS.monitor_questions,
                       heldout_tokens=FLAGS.monitor_tokens, window=32 if tiny else 128,
                       generation_prompts=FLAGS.monitor_generations, generation_tokens=8 if tiny else 40)
    monitor = Monitor(params, cfg, tok, [layer], spec, progress=None)
    rule = CollapseRule(FLAGS.collapse_perplexity_ratio or None,
                        None if FLAGS.collapse_accuracy_margin < 0 else FLAGS.collapse_accuracy_margin)
    logging.info("unedited: perplexity %.3f over %d tokens, general accuracy %.1f (chance %.1f)",
                 monitor.unedited["perplexity"], monitor.unedited["perplexity_tokens"],
                 monitor.unedited["general_accuracy"], monitor.unedited["general_chance"])
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    for method, b in tqdm(todo, desc="lifelong cells"):
        hp = hps[method]
        groups = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        last = run_cell(params, cfg, tok, cases, hp, cov, groups, b, log, cell_key(method, layer, b), monitor, rule,
                        stored_values, Path(FLAGS.cache_dir) / "lifelong")
        logging.info("%s B=%d: %d batches%s", method, b, last.index + 1,
                     f", stopped: {last.stopped}" if last.stopped else "")


if __name__ == "__main__":
    program.run(main)
