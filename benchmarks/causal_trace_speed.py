"""Causal tracing speed on SmolLM2-135M: every restoration of a prompt in one program (trace_fact)
against one restoration per forward pass (naive_trace, the way the reference implementation runs).

A restoration is one (kind, layer, token) site with all its noise samples: the batched program runs
3 x L x T of them; the naive loop runs each as one forward pass of the noise samples over every slot
and layer (timed on a spread of --naive_sites sites, whose scores are also checked against the
batched program's). Both run in this process, warm (compile seconds apart), the median of --reps.
`uptime` is printed before and after.

    python -m benchmarks.causal_trace_speed [--known_ids 0 1] [--noise_samples 10] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import numpy as np


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--known_ids", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--noise_samples", type=int, default=10)
    parser.add_argument("--naive_sites", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    from jaxedit import tracing
    from llama3_flax import checkpoint

    print("load before:", _uptime())
    cfg, params, tok = checkpoint.load_model("smollm2")
    facts = {f.known_id: f for f in tracing.read_knowns()}
    encoded = tracing.encode_facts(tok, tracing.read_knowns())
    std = tracing.embedding_noise_std(params, tracing.subject_token_ids(encoded))
    tc = tracing.TraceConfig(noise_samples=args.noise_samples)
    rows = []
    for known_id in args.known_ids:
        fact = tracing.encode_fact(tok, facts[known_id])
        target = tracing.greedy_next_token(params, cfg, fact, tc)
        length, l = len(fact.tokens), cfg.num_hidden_layers
        every = [(k, layer, t) for k in range(3) for layer in range(l) for t in range(length)]
        sites = [every[i] for i in np.linspace(0, len(every) - 1, args.naive_sites).round().astype(int)]
        compile_batched, batched = _timed(lambda: tracing.trace_fact(params, cfg, fact, target, std, tc))
        compile_naive, _ = _timed(lambda: tracing.naive_trace(params, cfg, fact, target, std, tc, sites=sites[:1]))
        t_batched = statistics.median(_timed(lambda: tracing.trace_fact(params, cfg, fact, target, std, tc))[0]
                                      for _ in range(args.reps))
        naive_runs = [_timed(lambda: tracing.naive_trace(params, cfg, fact, target, std, tc, sites=sites))
                      for _ in range(args.reps)]
        t_naive = statistics.median(t for t, _ in naive_runs)
        naive = naive_runs[0][1]
        diff = max(abs(naive.scores[s] - batched.scores[s]) for s in sites)
        rate_batched, rate_naive = len(every) / t_batched, len(sites) / t_naive
        rows.append([known_id, length, len(every), f"{compile_batched:.1f}", f"{t_batched:.2f}", f"{rate_batched:.1f}",
                     f"{compile_naive:.1f}", f"{rate_naive:.2f}", f"{rate_batched / rate_naive:.1f}", f"{diff:.1e}"])
        print(f"known_id {known_id} ({facts[known_id].prompt!r}): {len(every)} restorations in {t_batched:.2f} s "
              f"batched, {rate_naive:.2f} / s naive", flush=True)
    header = ["known_id", "tokens", "restorations", "batched first call s (compile)", "batched s",
              "batched restorations / s", "naive first call s", "naive restorations / s", "speed-up",
              "max |score diff|"]
    print(f"\nSmolLM2-135M float32, {args.noise_samples} noise samples, median of {args.reps}; "
          f"naive on {args.naive_sites} sites spread over the grid\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print("\nload after:", _uptime())


if __name__ == "__main__":
    main()
