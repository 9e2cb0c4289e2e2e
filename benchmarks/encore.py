"""ENCORE's two fixes on SmolLM2-135M, on the same CounterFact cases: value seconds and Adam steps per
request with and without most-probable early stopping (MPES), and ES/PS/NS/S of one MEMIT batch edited
plain, with MPES, with the norm constraint, and with both (ENCORE). Compiling is paid before timing
(one warm-up call of each value program on other cases).

    python -m benchmarks.encore [--n 32] [--norm 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="CounterFact cases in the batch")
    ap.add_argument("--norm", type=float, default=10.0, help="the norm constraint's weight")
    ap.add_argument("--cache_dir", default=None, help="C0 and template caches (default $JAXEDIT_CACHE)")
    args = ap.parse_args()

    import jax
    import numpy as np

    import jaxedit
    from jaxedit import compilation_cache
    from jaxedit.data import paths
    from jaxedit.eval.metrics import evaluate
    from llama3_flax import checkpoint

    compilation_cache.enable()
    cache = args.cache_dir or str(paths.cache_dir())
    cfg, params, tok = checkpoint.load_model("smollm2")
    hp = jaxedit.preset_for(cfg, "memit")
    C0 = jaxedit.preservation_covariance(params, cfg, tok, hp.layers, hp.covariance, cache_dir=os.path.join(cache, "cov"),
                                         progress=False)
    groups = jaxedit.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    cases = jaxedit.load_counterfact("edit", n=2 * args.n, seed=0)
    warm, cases = cases[args.n:], cases[:args.n]
    mpes = hp.replace(value=dataclasses.replace(hp.value, most_probable_stop=True))

    values, rows = {}, []
    for name, h in (("plain", hp), ("MPES", mpes)):
        jaxedit.edit_values(params, cfg, tok, warm, h, templates=groups)  # compile
        t0 = time.perf_counter()
        v = jax.block_until_ready(jaxedit.edit_values(params, cfg, tok, cases, h, templates=groups))
        values[name] = (v, time.perf_counter() - t0)
    before = evaluate(params, cfg, tok, cases, progress=False).aggregate
    for name, h, v in (("MEMIT", hp, "plain"), ("MEMIT + MPES", mpes, "MPES"),
                       (f"MEMIT + norm {args.norm:g}", hp.replace(norm_constraint=args.norm), "plain"),
                       (f"ENCORE (MPES + norm {args.norm:g})", mpes.replace(norm_constraint=args.norm), "MPES")):
        vals, seconds = values[v]
        edited, report = jaxedit.edit(params, cfg, tok, cases, h, covariances=C0, templates=groups, values=vals)
        agg = evaluate(edited, cfg, tok, cases, progress=False).aggregate
        rows.append((name, seconds, float(np.mean(np.asarray(vals.steps))), report.delta_norms[0], agg))

    print(f"SmolLM2-135M, MEMIT at layer {hp.layers[0]}, one batch of {args.n} CounterFact cases; "
          f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores")
    print("| edit | value s | Adam steps / request | ||dW|| | ES | PS | NS | S | EM |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| unedited | – | – | – | {before.es:.1f} | {before.ps:.1f} | {before.ns:.1f} | {before.s:.1f} | {before.em:.1f} |")
    for name, seconds, steps, norm, agg in rows:
        print(f"| {name} | {seconds:.1f} | {steps:.1f} | {norm:.1f} | {agg.es:.1f} | {agg.ps:.1f} | {agg.ns:.1f} | "
              f"{agg.s:.1f} | {agg.em:.1f} |")


if __name__ == "__main__":
    main()
