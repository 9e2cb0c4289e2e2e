"""Speed of the preservation covariance C0 and of the value loop on SmolLM2-135M (float32, CPU).

Prints, in one run:
  * the float32 n^3 matmul rate of JAX (--matmul), measured before and after every timed stage; each
    stage's rate is compared with the mean of the two measurements around it (a shared machine drifts);
  * C0 (jaxedit.editing.covariance.preservation_covariance, no cache) for one layer (--layer) and for all
    layers in one pass, over --chunks samples of at most --max_length tokens of --corpus: seconds,
    tokens per second, achieved GFLOP/s (useful FLOPs: real tokens only, causal attention over each
    sample's own earlier tokens, the k k^T products), % of the matmul rate, and the share of token
    slots the passes ran that were padding. Tokenising the corpus is timed apart (its own row) and is
    not in the C0 seconds' rate;
  * the value loop (jaxedit.editing.editor.edit_values, MEMIT at --layer) at each of --value_batches
    CounterFact requests: seconds per request and GFLOP/s (FLOP model of benchmarks/edit_speed.py).

Every stage runs once to compile before it is timed.

    python -m benchmarks.c0_speed [--chunks 2000] [--max_length 256] [--skip all_layers values]
                                  [--value_batches 1 8 16 32] [--json_out runs/c0_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.edit_speed import matmul_rate_jax



# =============================================================================== FLOP models
def layer_linear_flops(cfg) -> int:
    """Matmul FLOPs of one decoder layer per token (projections and MLP; 2 per multiply-add)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return 2 * d * (q + 2 * kv) + 2 * q * d + 3 * 2 * d * f


def c0_flops(cfg, lengths, layers) -> int:
    """Useful FLOPs of C0 for `layers` over samples of these lengths: every layer up to the last
    requested one on the real tokens (attention: QK^T and AV over each token's own sample up to
    itself), plus the F x F outer product of each real token's key at every requested layer."""
    lengths = np.asarray(lengths, np.int64)
    tokens = int(lengths.sum())
    causal_pairs = int(np.sum(lengths * (lengths + 1) // 2))
    attention = 4 * cfg.num_attention_heads * cfg.head_dim * causal_pairs
    run = max(layers) + 1
    f = cfg.intermediate_size
    return run * (tokens * layer_linear_flops(cfg) + attention) + len(layers) * tokens * 2 * f * f


# =============================================================================== helpers
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Reference:
    """Matmul rates measured around each timed stage."""

    def __init__(self, n: int):
        self.n = n
        self.rates = [matmul_rate_jax(n)]

    def around(self, fn):
        """Runs fn, measures the matmul rate after it; returns (fn's result, seconds, mean rate of the
        measurements just before and just after)."""
        before = self.rates[-1]
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        self.rates.append(matmul_rate_jax(self.n))
        return out, seconds, 0.5 * (before + self.rates[-1])


def table(header, rows) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)):
            return str(v)
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


# =============================================================================== C0
def c0_spec(args, n_samples: int):
    from jaxedit.hparams import CovarianceHparams

    return CovarianceHparams(corpus=args.corpus, n_samples=n_samples, max_length=args.max_length,
                             batch_size=args.batch_size)


def run_c0(ctx, args, ref, layers, label):
    import jax

    from jaxedit.editing import covariance

    params, cfg, tok = ctx["params"], ctx["cfg"], ctx["tok"]
    run = lambda n: jax.block_until_ready(covariance.preservation_covariance(
        params, cfg, tok, layers, c0_spec(args, n), cache_dir=None, progress=False,
        layers_per_pass=args.layers_per_pass))
    t0 = time.perf_counter()
    run(min(args.chunks, args.warmup_chunks))  # compiles
    warm = time.perf_counter() - t0
    out, seconds, rate = ref.around(lambda: run(args.chunks))
    seconds -= ctx["tokenize_s"]  # preservation_covariance tokenises the corpus each call
    flops = c0_flops(cfg, ctx["lengths"], layers)
    tokens = int(np.sum(ctx["lengths"]))
    row = {"label": label, "layers": len(layers), "seconds": seconds, "tokens": tokens,
           "tokens_per_s": tokens / seconds, "tflop": flops / 1e12, "gflops": flops / seconds / 1e9,
           "matmul_gflops": rate, "pct_matmul": 100 * flops / seconds / 1e9 / rate,
           "padded_share": ctx["padded_share"], "warmup_s": warm}
    print(f"  {label}: {seconds:.1f}s, {row['gflops']:.1f} GFLOP/s ({row['pct_matmul']:.0f}% of "
          f"{rate:.0f}); load {load_average()}", flush=True)
    return row, out


# =============================================================================== values
def run_values(ctx, args, ref):
    import jax

    from benchmarks.edit_speed import jaxedit_value_flops, value_batch_shape
    from benchmarks.stages import compile_values
    from jaxedit.editing import editor

    params, cfg, tok, hp, g, reqs = (ctx[k] for k in ("params", "cfg", "tok", "hp", "templates", "requests"))
    rows = []
    for b in args.value_batches:
        batch = reqs[:b]
        compile_s = compile_values(params, cfg, tok, batch, hp, g)
        vals, seconds, rate = ref.around(lambda: jax.block_until_ready(
            editor.edit_values(params, cfg, tok, batch, hp, templates=g)))
        steps = [int(s) for s in np.asarray(vals.steps)]
        flops = jaxedit_value_flops(cfg, hp.layers[-1], value_batch_shape(tok, batch, g), max(steps) + 1)["total"]
        rows.append({"batch": b, "seconds": seconds, "s_per_request": seconds / b, "tflop": flops / 1e12,
                     "tflop_per_request": flops / b / 1e12, "gflops": flops / seconds / 1e9, "matmul_gflops": rate,
                     "pct_matmul": 100 * flops / seconds / 1e9 / rate, "mean_steps": float(np.mean(steps)),
                     "compile_s": compile_s})
        print(f"  values batch {b}: {seconds:.1f}s, {seconds / b:.2f} s/request, {flops / seconds / 1e9:.1f} "
              f"GFLOP/s; load {load_average()}", flush=True)
    return rows


# =============================================================================== main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="corpus samples for C0")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per sample at most")
    parser.add_argument("--corpus", default=None,
                        help="default: $JAXEDIT_DATA/corpus/wikitext-103-train-head.tokens")
    parser.add_argument("--layer", type=int, default=3, help="the one-layer C0 and the values' layer")
    parser.add_argument("--batch_size", type=int, default=8, help="C0 rows per forward pass")
    parser.add_argument("--layers_per_pass", type=int, default=None)
    parser.add_argument("--warmup_chunks", type=int, default=64, help="samples of the compiling C0 run")
    parser.add_argument("--value_batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--seed", type=int, default=0, help="CounterFact selection")
    parser.add_argument("--matmul", type=int, default=2048)
    parser.add_argument("--skip", nargs="*", default=[], choices=["layer", "all_layers", "values"])
    parser.add_argument("--cache_dir", default=None, help="templates cache (default $JAXEDIT_CACHE)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args(argv)

    import jax

    from jaxedit import hparams
    from jaxedit.data import corpus, counterfact, paths
    from jaxedit.editing import covariance, templates as jtemplates
    from llama3_flax import checkpoint

    cfg, params, tok = checkpoint.load_model("smollm2")
    if args.corpus is None:
        args.corpus = str(paths.corpus_file("wikitext-103-train-head.tokens"))
    if args.cache_dir is None:
        args.cache_dir = str(paths.cache_dir())
    ref = Reference(args.matmul)
    print(f"SmolLM2-135M float32, jax {jax.__version__}, {os.cpu_count()} CPUs; load {load_average()}; "
          f"matmul {args.matmul}^3 {ref.rates[0]:.1f} GFLOP/s", flush=True)
    ctx = {"params": params, "cfg": cfg, "tok": tok}
    t0 = time.perf_counter()
    samples = corpus.corpus_samples(tok, corpus.CorpusSpec.parse(args.corpus).documents(), args.chunks,
                                    args.max_length)
    ctx["tokenize_s"] = time.perf_counter() - t0
    ctx["lengths"] = [len(s) for s in samples]
    ctx["padded_share"] = covariance.padding_share(samples, args.batch_size, args.max_length)
    results = {"args": vars(args), "jax": jax.__version__, "cpus": os.cpu_count(), "samples": len(samples),
               "tokens": int(np.sum(ctx["lengths"])), "tokenize_s": ctx["tokenize_s"], "c0": [], "values": []}
    print(f"corpus: {len(samples)} samples, {results['tokens']} tokens, tokenised in {ctx['tokenize_s']:.1f}s",
          flush=True)

    c0 = {}
    if "layer" not in args.skip:
        row, c0["layer"] = run_c0(ctx, args, ref, [args.layer], f"C0 layer {args.layer}")
        results["c0"].append(row)
    if "all_layers" not in args.skip:
        every = list(range(cfg.num_hidden_layers))
        row, c0["all"] = run_c0(ctx, args, ref, every, f"C0 all {len(every)} layers")
        results["c0"].append(row)
        if "layer" in c0:  # the all-layers pass gives the same C0 as the one-layer pass
            a, b = (np.asarray(x[args.layer], np.float64) for x in (c0["all"], c0["layer"]))
            results["all_vs_one_layer_rel"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    if "values" not in args.skip:
        hp = hparams.preset("smollm2-135m", "memit")
        hp = hp.replace(layers=(args.layer,))
        ctx["hp"] = hp
        ctx["requests"] = counterfact.load_counterfact("edit", n=max(args.value_batches), seed=args.seed)
        ctx["templates"] = jtemplates.context_templates(params, cfg, tok, hp.templates, cache_dir=args.cache_dir)
        results["values"] = run_values(ctx, args, ref)
    results["matmul_gflops"] = ref.rates

    print(f"\nSmolLM2-135M float32 on {os.cpu_count()} CPUs, jax {jax.__version__}; load average at the end "
          f"{load_average()}; float32 {args.matmul}^3 matmul rates measured around the stages: "
          + ", ".join(f"{r:.0f}" for r in ref.rates) + " GFLOP/s")
    if results["c0"]:
        share = ctx["padded_share"]
        print(f"\nC0 over {len(samples)} samples of <= {args.max_length} tokens ({results['tokens']} tokens; "
              f"tokenising {ctx['tokenize_s']:.1f}s, not included); padded share of the token slots run: "
              + (f"{100 * share:.2f}%" if share is not None else "n/a"))
        print(table(["C0", "seconds", "tokens/s", "TFLOP", "GFLOP/s", "matmul GFLOP/s", "% of matmul",
                     "warm-up s"],
                    [(r["label"], r["seconds"], r["tokens_per_s"], r["tflop"], r["gflops"], r["matmul_gflops"],
                      r["pct_matmul"], r["warmup_s"]) for r in results["c0"]]))
        if len(results["c0"]) == 2:
            one, every = results["c0"]
            print(f"all layers / one layer: {every['seconds'] / one['seconds']:.2f}x the seconds for "
                  f"{every['tflop'] / one['tflop']:.2f}x the FLOPs"
                  + (f"; C0 of layer {args.layer} from the all-layers pass vs the one-layer pass: relative "
                     f"difference {results['all_vs_one_layer_rel']:.2e}" if "all_vs_one_layer_rel" in results else ""))
    if results["values"]:
        print(f"\nValue loop (MEMIT, layer {args.layer}, warm)")
        print(table(["batch", "seconds", "s/request", "TFLOP", "TFLOP/request", "GFLOP/s", "matmul GFLOP/s",
                     "% of matmul", "mean steps", "compile s"],
                    [(r["batch"], r["seconds"], r["s_per_request"], r["tflop"], r["tflop_per_request"], r["gflops"],
                      r["matmul_gflops"], r["pct_matmul"], r["mean_steps"], r["compile_s"])
                     for r in results["values"]]))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
