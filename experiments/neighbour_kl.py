"""Why do neighbours recover when late layers are edited? How far each single edit moves the model's
next-token prediction at its neighbourhood prompt, layer by layer.

For every (method, layer) cell, N single edits are made at that layer, each on the unedited model (as
in the layer sweep, on the same seeded cases, so its cached values serve), and for each edit the KL
divergence KL(unedited || edited) of the next-token distribution is measured at the last token of the
case's neighbourhood prompt, of its rewrite prompt (how far the edit moves what it is meant to move)
and of its paraphrase. The cell also scores its N cases, each under its own edit (ES, PS, NS and
margins, per case; jaxedit.evaluate(edits=) in one pass), beside the same cases unedited.

The hypothesis it tests: at late layers an edit moves the neighbour's output less (a smaller KL at the
neighbour), and more so than it moves its own prompt's.

One JSONL record per finished cell; a restarted run skips finished cells (see experiments.results_log).

  python -m experiments.neighbour_kl --layers=all --methods=memit --n=64 --out=runs/neighbour_kl.jsonl
"""
from __future__ import annotations

import logging
import time

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from experiments import program
from experiments import records
from experiments import results_log
from experiments import value_cache
from experiments import world

flags.DEFINE_string("layers", "all", "comma-separated layers to edit, or 'all'")
flags.DEFINE_string("methods", "memit", "comma-separated editors: memit, emmet, rome")
flags.DEFINE_integer("n", 64, "single edits per cell (the layer sweep's --n, to share its cases and values)")
program.define_common_flags("runs/neighbour_kl.jsonl")
FLAGS = flags.FLAGS

PROMPTS = ("neighbour", "rewrite", "paraphrase")


def cell_key(method: str, layer: int, n: int) -> dict:
    return program.cell_key("neighbour_kl", method=method, layer=int(layer), n=int(n))


def case_prompts(case) -> tuple[str, str, str]:
    """The neighbourhood, rewrite and paraphrase prompt of a case (first of each kind)."""
    if not case.neighborhood_prompts or not case.paraphrase_prompts:
        raise ValueError(f"case {case.case_id} has no neighbourhood or no paraphrase prompt")
    return case.neighborhood_prompts[0], case.filled_prompt, case.paraphrase_prompts[0]


def main(argv):
    del argv
    import jax.numpy as jnp

    from jaxedit.editing import editor, pm
    from jaxedit.eval import drift, independent, metrics

    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    program.init_jax()
    cfg, params, tok = world.load_model(FLAGS.model, FLAGS.mesh)
    layers = list(range(cfg.num_hidden_layers)) if FLAGS.layers == "all" else program.parse_int_list(FLAGS.layers)
    log = results_log.open_log(FLAGS.out)
    todo = [(m, l) for l in layers for m in methods if not log.is_finished(cell_key(m, l, FLAGS.n))]
    logging.info("neighbour KL: %d cells to run -> %s", len(todo), FLAGS.out)
    if not todo:
        return
    cases = world.load_cases(FLAGS.counterfact, n=FLAGS.n, seed=FLAGS.seed)
    prompts = [p for c in cases for p in case_prompts(c)]
    before_logp = drift.last_token_logprobs(params, cfg, tok, prompts, batch_size=len(PROMPTS))
    unedited = records.case_dicts(metrics.evaluate(params, cfg, tok, cases, progress=False).cases)
    hp0 = world.hparams_from_flags(methods[0], cfg=cfg)
    cov = world.covariances(params, cfg, tok, sorted({l for _, l in todo}), hp0, FLAGS.cache_dir, FLAGS.corpus)
    groups = {m: world.templates(params, cfg, tok, world.hparams_from_flags(m, cfg=cfg), FLAGS.cache_dir)
              for m in methods}
    stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
    factors = {}
    for method, layer in tqdm(todo, desc="neighbour KL cells"):
        hp = world.hparams_from_flags(method, layer, cfg=cfg)
        if (layer, hp.preservation_shift) not in factors:
            factors = {(layer, hp.preservation_shift): pm.factor_preservation(jnp.asarray(cov[layer]),
                                                                              shift=hp.preservation_shift)}
        t0 = time.perf_counter()
        values = stored_values.get(cases, hp, groups[method])
        kl_rows, changes, norms = [], [], []
        for i, case in enumerate(tqdm(cases, desc=f"{method} L{layer} edits", leave=False)):
            new, report = editor.edit(params, cfg, tok, [case], hp,
                                      covariances={layer: factors[layer, hp.preservation_shift]},
                                      templates=groups[method], values=value_cache.slice_values(values, i))
            after_logp = drift.last_token_logprobs(new, cfg, tok, case_prompts(case), batch_size=len(PROMPTS))
            kl = drift.kl_divergence(before_logp[i * len(PROMPTS):(i + 1) * len(PROMPTS)], after_logp)
            kl_rows.append({"case_id": case.case_id, **{k: float(v) for k, v in zip(PROMPTS, kl)}})
            changes.append(independent.change_of(params, new, hp.layers, rank=1))
            norms.append(report.delta_norms[0])
            del new
        after = records.case_dicts(metrics.evaluate(params, cfg, tok, cases, batch_size=8, progress=False,
                                                    edits=independent.stack_changes(changes)).cases)
        rec = {"type": "cell", "key": cell_key(method, layer, FLAGS.n), "attempt": results_log.new_attempt(),
               "kl": kl_rows, "mean_kl": {k: float(np.mean([r[k] for r in kl_rows])) for k in PROMPTS},
               "aggregate": records.aggregate_cases(after), "cases": after, "before_cases": unedited,
               "delta_norms": norms, "hparams": {"mom2_update_weight": hp.mom2_update_weight,
                                                 "v_steps": hp.value.v_num_grad_steps},
               "seconds": time.perf_counter() - t0}
        log.append(rec)
        m = rec["mean_kl"]
        logging.info("%s layer %d: mean KL neighbour %.3g rewrite %.3g paraphrase %.3g; NS %.1f (%.0fs)", method,
                     layer, m["neighbour"], m["rewrite"], m["paraphrase"], rec["aggregate"]["ns"] or 0, rec["seconds"])


if __name__ == "__main__":
    program.run(main)
