"""bfloat16 against float32 weights: one MEMIT batch edit of the same cases, decisions compared case by case.

Each cell loads the model with every weight in one dtype (--dtypes; bfloat16 is the Llama-3-8B path:
matmuls multiply in bfloat16 and sum in float32, C0 is accumulated in float32 and the solve runs in
float64, the update is written in bfloat16) and edits the same --n CounterFact cases in one batch at
the preset's layer: C0 of that model, the target values optimised on that model, the edit, and
CounterFact scoring of the edited model and of the unedited one, in the same dtype. Both cells use the
context templates sampled once from the float32 model, so the only difference is the weights' dtype.
Each record carries the per-case decisions and margins and the seconds of every stage (compilation
included); the edit's change of down_proj is kept in <cache_dir>/precision to compare the two updates.

One JSONL record per finished cell; a restart skips finished cells, and values computed before an
interruption are reused from the value cache (per model, per request). Once every cell is done the
comparison is printed and written to --report.

  python -m experiments.precision_sweep --n=64 --out=experiments/results/raw/precision_sweep.jsonl \\
      --report=experiments/results/precision_bfloat16.md
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from absl import flags

from experiments import precision
from experiments import program
from experiments import records
from experiments import results_log
from experiments import value_cache
from experiments import world

flags.DEFINE_string("dtypes", "float32,bfloat16", "comma-separated weight dtypes; the first is the reference")
flags.DEFINE_string("method", "memit", "editor: memit, emmet")
flags.DEFINE_integer("n", 64, "cases, edited in one batch")
flags.DEFINE_integer("layer", None, "edit layer (default: the model preset's, SmolLM2: 3)")
flags.DEFINE_string("report", None, "markdown comparison to write once every cell is done")
program.define_common_flags("runs/precision_sweep.jsonl")
FLAGS = flags.FLAGS

def cell_key(dtype: str, method: str, layer: int, n: int) -> dict:
    return program.cell_key("precision", dtype=dtype, method=method, layer=int(layer), n=int(n))


def load_in(spec: str, dtype: str):
    """(cfg, params, tokenizer) of a --model value with every weight in dtype."""
    if spec == program.TINY:
        from jaxedit import testing

        return testing.tiny_model(dtype=dtype)
    from llama3_flax import checkpoint

    return checkpoint.load_model(spec, dtype=dtype)


def run_cell(params, cfg, tok, cases, hp, groups, stored_values, delta_path: Path) -> dict:
    """C0, values, the edit and scoring (edited and unedited) of one dtype, with each stage's seconds."""
    import jax
    import jax.numpy as jnp
    from jaxedit.editing import editor
    from jaxedit.eval import metrics

    seconds = {}
    t0 = time.perf_counter()
    cov = world.covariances(params, cfg, tok, list(hp.layers), hp, FLAGS.cache_dir, FLAGS.corpus, progress=False)
    seconds["c0"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = jax.block_until_ready(stored_values.get(cases, hp, groups))
    seconds["values"] = time.perf_counter() - t0
    new, report = editor.edit(params, cfg, tok, cases, hp, covariances=cov, templates=groups, values=values)
    seconds["keys"], seconds["solve"] = report.seconds["keys"], report.seconds["solve"]
    layer = hp.layers[0]
    delta = np.asarray((new["layers"]["down_proj"][layer].astype(jnp.float32)
                        - params["layers"]["down_proj"][layer].astype(jnp.float32)))
    np.save(delta_path, delta)
    t0 = time.perf_counter()
    after = metrics.evaluate(new, cfg, tok, cases, progress=False)
    seconds["scoring"] = time.perf_counter() - t0
    before = metrics.evaluate(params, cfg, tok, cases, progress=False)
    solve = report.solves[0]
    return {"aggregate": records.aggregate_dict(after.aggregate), "cases": records.case_dicts(after.cases),
            "before": records.aggregate_dict(before.aggregate), "before_cases": records.case_dicts(before.cases),
            "value_loss": [float(x) for x in values.loss], "value_nll": [float(x) for x in values.nll],
            "value_steps": [int(x) for x in values.steps], "delta_norm": report.delta_norms[0],
            "delta_file": delta_path.name, "preservation_cond": float(solve.preservation_cond),
            "system_cond": float(solve.cond), "stage_seconds": seconds, "seconds": sum(seconds.values()),
            "load_average": os.getloadavg()}


def main(argv):
    del argv
    dtypes = [d.strip() for d in FLAGS.dtypes.split(",") if d.strip()]
    program.init_jax()
    log = results_log.open_log(FLAGS.out)
    out = Path(FLAGS.out)
    deltas = Path(FLAGS.cache_dir) / "precision"
    deltas.mkdir(parents=True, exist_ok=True)
    reference = None
    cells = {}
    cases = world.load_cases(FLAGS.counterfact, n=FLAGS.n, seed=FLAGS.seed)
    for dtype in dtypes:
        cfg, params, tok = load_in(FLAGS.model, dtype)
        hp = world.hparams_for(FLAGS.model, FLAGS.method, FLAGS.layer, FLAGS.v_steps, FLAGS.cov_samples,
                               FLAGS.cov_max_length, cfg=cfg)
        key = cell_key(dtype, FLAGS.method, hp.layers[0], FLAGS.n)
        if reference is None:  # the templates of the reference (first) dtype's model, for every cell
            reference = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        done = [r for r in log.records if r.get("type") == "cell" and r.get("key") == key]
        if done:
            cells[dtype] = done[-1]
            continue
        logging.info("%s: %s, %d cases at layer %d", dtype, FLAGS.method, FLAGS.n, hp.layers[0])
        stored_values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir, FLAGS.value_cache)
        res = run_cell(params, cfg, tok, cases, hp, reference, stored_values,
                       deltas / f"{out.stem}.delta_{dtype}_{FLAGS.method}_L{hp.layers[0]}_n{FLAGS.n}.npy")
        rec = {"type": "cell", "key": key, "attempt": results_log.new_attempt(), "templates": reference, **res}
        log.append(rec)
        cells[dtype] = rec
        a = res["aggregate"]
        logging.info("%s: ES %.1f PS %.1f NS %.1f S %.1f (%.0fs: %s)", dtype, a["es"], a["ps"], a["ns"], a["s"],
                     res["seconds"], ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items()))
        del params
    load = os.getloadavg()
    text = (f"{FLAGS.model}: {FLAGS.method} at layer {hp.layers[0]}, one batch of {FLAGS.n} CounterFact "
            f"'{FLAGS.counterfact}' cases (seed {FLAGS.seed}); every weight in the dtype; seconds include "
            f"compilation (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})\n\n"
            + precision.compare(cells, deltas))
    print(text)
    if FLAGS.report:
        Path(FLAGS.report).write_text(text + "\n")


if __name__ == "__main__":
    program.run(main)
