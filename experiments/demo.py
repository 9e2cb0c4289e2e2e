"""The main demo: edit CounterFact facts in the offline SmolLM2 model with ROME, MEMIT and EMMET, and show
the metrics (ES, PS, NS, S, and the probability margins EM, PM, NM) before and after, plus one
generation before and after an edit.

  * ROME: one fact at a time, each edit made on the unedited model (single edits, as the layer sweep);
  * MEMIT and EMMET: all cases in one batch edit.

All at the preset edit layer (SmolLM2: 3). The covariance C0 (200 WikiText-103 samples), the context
templates and the target values are cached in $JAXEDIT_CACHE (default ~/.cache/jaxedit), so a second
run is faster. CounterFact and the corpus are read from $JAXEDIT_DATA (make demo sets ../shared/data).

  python -m experiments.demo                 # or: make demo
  python -m experiments.demo --cases=0,1,4,5,6,7 --methods=memit,emmet
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments import program
from experiments import value_cache
from experiments import world

flags.DEFINE_string("model", "smollm2", "'smollm2' (the offline GGUF), a .gguf file or an HF folder")
flags.DEFINE_string("cases", "0,1,5,7", "CounterFact case ids of the shared edit split")
flags.DEFINE_string("methods", "rome,memit,emmet", "editors to run")
flags.DEFINE_string("cache_dir", str(program.DEFAULT_CACHE), "covariance / template / value caches")
flags.DEFINE_integer("max_new_tokens", 16, "tokens of the before/after generation")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from jaxedit import compilation_cache
    from jaxedit.editing import editor, pm
    from jaxedit.eval import metrics
    from jaxedit.eval import tables
    from llama3_flax import generate

    compilation_cache.enable()
    t_start = time.perf_counter()
    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    print(f"loading {FLAGS.model} ...", flush=True)
    cfg, params, tok = world.load_model(FLAGS.model)
    cases = world.load_cases("edit", ids=program.parse_int_list(FLAGS.cases))
    spec = "smollm2" if FLAGS.model == "smollm2" else FLAGS.model
    hps = {m: world.hparams_for(spec, m, cfg=cfg) for m in methods}
    layer = hps[methods[0]].layers[0]
    print(f"{len(cases)} CounterFact cases, edit layer {layer}:")
    for r in cases:
        print(f"  [{r.case_id}] {r.filled_prompt!r}: {r.target_true} -> {r.target_new}")

    cov = world.covariances(params, cfg, tok, [layer], hps[methods[0]], FLAGS.cache_dir, progress=False)
    cov = {l: pm.factor_preservation(c) for l, c in cov.items()}  # factor C0 once, not once per edit
    values = value_cache.ValueCache(params, cfg, tok, FLAGS.cache_dir)
    before = metrics.evaluate(params, cfg, tok, cases)
    rows, edited = {"unedited": before.aggregate}, {}
    for method in methods:
        t0 = time.perf_counter()
        hp = hps[method]
        groups = world.templates(params, cfg, tok, hp, FLAGS.cache_dir)
        vals = values.get(cases, hp, groups)
        if hp.spec.max_requests == 1:  # ROME: one at a time, each on the unedited model
            per_case = []
            for i, case in enumerate(cases):
                new, _ = editor.edit(params, cfg, tok, [case], hp, covariances=cov, templates=groups,
                                     values=value_cache.slice_values(vals, i))
                per_case += metrics.evaluate(new, cfg, tok, [case]).cases
                if i == 0:
                    edited[method] = new
            agg, label = metrics.aggregate(per_case), "ROME (single edits)"
        else:
            new, _ = editor.edit(params, cfg, tok, cases, hp, covariances=cov, templates=groups, values=vals)
            agg, label = metrics.evaluate(new, cfg, tok, cases).aggregate, f"{method.upper()} (one batch)"
            edited[method] = new
        rows[label] = agg
        print(f"\n== {label}: {time.perf_counter() - t0:.0f}s\n{tables.format_before_after(before.aggregate, agg)}",
              flush=True)

    print("\n== all editors (percent; S = harmonic mean of ES, PS, NS)")
    print(tables.format_table(rows))

    method = "memit" if "memit" in edited else next(iter(edited))
    case = cases[0]
    prompts = [case.filled_prompt, *case.paraphrase_prompts[:1]]
    old = generate.generate_text(params, cfg, tok, prompts, max_new_tokens=FLAGS.max_new_tokens)
    new = generate.generate_text(edited[method], cfg, tok, prompts, max_new_tokens=FLAGS.max_new_tokens)
    print(f"\n== generation before / after the {method.upper()} edit (greedy; target {case.target_true} -> "
          f"{case.target_new})")
    for p, a, b in zip(prompts, old, new):
        print(f"  {p!r}\n    before: {a!r}\n    after:  {b!r}")
    print(f"\ndone in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    app.run(main)
