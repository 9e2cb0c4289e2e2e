"""Where a layer-sweep cell's time goes, with each edited model scored alone and in one pass.

One MEMIT cell (N single edits at one layer, each on the unedited model) runs twice per layer in one
process, exactly as experiments.layer_sweep runs it: first with --scoring=per_model (one materialised
model per edit, scored alone; the target values are computed here, batched, and timed), then with
--scoring=one_pass (the same values from the value cache, each edit kept as its rank-1 factors and
all cases scored together on the unedited model). The same per-case decisions are asserted. The
table gives seconds per stage (values, solve: keys + PM solve + the edit's factors, scoring) and the
ratio of a whole cell and of its scoring; a 30-layer sweep's time is the sum over its layers.

  python -m benchmarks.layer_sweep_stages --layers=1,3,5 --n=64   # the layer sweep's flags
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from experiments import layer_sweep  # its flags: --layers, --n, --model, --seed, --cache_dir, ...

FLAGS = flags.FLAGS
flags.FLAGS.set_default("layers", "1,3,5")
flags.FLAGS.set_default("n", 64)


def main(argv):
    del argv
    import jax.numpy as jnp

    from experiments import value_cache, world
    from jaxedit.editing import pm

    cache = FLAGS.cache_dir
    layers = [int(x) for x in FLAGS.layers.split(",")]
    cfg, params, tok = world.load_model(FLAGS.model)
    cases = world.load_cases("edit", n=FLAGS.n, seed=FLAGS.seed)
    hp0 = world.hparams_for(FLAGS.model, "memit", cfg=cfg)
    cov = world.covariances(params, cfg, tok, layers, hp0, cache)
    groups = world.templates(params, cfg, tok, hp0, cache)
    rows = []
    with tempfile.TemporaryDirectory() as values_dir:  # values computed here, then shared by the second run
        stored = value_cache.ValueCache(params, cfg, tok, values_dir)
        for layer in layers:
            hp = world.hparams_for(FLAGS.model, "memit", layer, cfg=cfg)
            factor = {layer: pm.factor_preservation(jnp.asarray(cov[layer]))}
            warm = cases[:2]  # compile the solve, scoring and value shapes outside the timed runs
            for scoring in ("per_model", "one_pass"):
                layer_sweep.run_cell(params, cfg, tok, warm, hp, factor, groups, value_cache.ValueCache(
                    params, cfg, tok, None, enabled=False), scoring)
            out = {s: layer_sweep.run_cell(params, cfg, tok, cases, hp, factor, groups, stored, s)
                   for s in ("per_model", "one_pass")}
            a, b = out["per_model"], out["one_pass"]
            same = all((x["es"], x["ps"], x["ns"]) == (y["es"], y["ps"], y["ns"]) for x, y in zip(a["cases"], b["cases"]))
            if not same:
                raise AssertionError(f"layer {layer}: one-pass scoring changed a decision")
            rows.append((layer, a["stage_seconds"], b["stage_seconds"]))

    load = os.getloadavg()
    print(f"\nMEMIT layer-sweep cells, SmolLM2, {FLAGS.n} single edits per cell; load {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; {time.strftime('%Y-%m-%d')}\n")
    print("| layer | values s | solve s (per-model / one-pass) | scoring s per model | scoring s one pass | "
          "scoring speed-up | cell s per model | cell s one pass | cell speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    tot = {"v": 0.0, "sa": 0.0, "sb": 0.0, "ca": 0.0, "cb": 0.0}
    for layer, a, b in rows:
        cell_a = a["values"] + a["solve"] + a["scoring"]
        cell_b = a["values"] + b["solve"] + b["scoring"]  # the second run read its values from the cache
        print(f"| {layer} | {a['values']:.1f} | {a['solve']:.1f} / {b['solve']:.1f} | {a['scoring']:.1f} | "
              f"{b['scoring']:.2f} | {a['scoring'] / b['scoring']:.1f}x | {cell_a:.1f} | {cell_b:.1f} | "
              f"{cell_a / cell_b:.2f}x |")
        tot["v"] += a["values"]; tot["sa"] += a["scoring"]; tot["sb"] += b["scoring"]
        tot["ca"] += cell_a; tot["cb"] += cell_b
    print(f"| all | {tot['v']:.1f} | | {tot['sa']:.1f} | {tot['sb']:.2f} | {tot['sa'] / tot['sb']:.1f}x | "
          f"{tot['ca']:.1f} | {tot['cb']:.1f} | {tot['ca'] / tot['cb']:.2f}x |")


if __name__ == "__main__":
    app.run(main)
