"""Editing at Llama-3-8B scale on one GPU: random weights of the real shapes, synthetic requests.

Measures, on random bfloat16 weights of llama3_flax.config.llama3_8b (no checkpoint needed):
  * C0 for all 32 layers in one pass over --cov_tokens (default 1M) random tokens;
  * MEMIT and EMMET at layer 1 for a batch of --n (default 1024) synthetic requests: seconds per
    stage (templates, keys, values, solve), warm, with compile seconds apart; the values (and keys)
    are the same computation for both methods and are computed once;
  * the value optimisation's achieved TFLOP/s (analytic FLOP count of benchmarks/edit_speed.py) against
    a measured bfloat16 matmul rate;
  * peak device memory (jax memory_stats; the process's max RSS where the device reports none).
Random weights never reach the early-stop loss, so every request runs all value steps.

    python -m benchmarks.gpu_llama3_8b [--n 1024] [--cov_tokens 1000000] [--json_out $OUT/gpu.json]
    python -m benchmarks.gpu_llama3_8b --dry         # the same script on a tiny config, in seconds on a CPU

--dry runs every stage of the real run on a 2-layer tiny config in the real run's dtype (bfloat16),
with 4 requests in one value chunk, 2 value steps and a few thousand C0 tokens, so that a test on
a CPU knows that the script a GPU would run starts and gets through (tests/benchmarks).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from jaxedit.testing import WordTokenizer


RELATIONS = ("{} works in the city of", "{} is a citizen of", "The mother tongue of {} is", "{} was created by",
             "{} plays the instrument", "The headquarters of {} are in", "{} is affiliated with the religion of",
             "{} speaks the language")


def synthetic_requests(n: int, seed: int = 0):
    import numpy as np

    from jaxedit.requests import EditRequest

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "tos", "vu", "zel", "por", "dan", "shi", "qua", "bre"]
    out = []
    for i in range(n):
        subject = " ".join("".join(rng.choice(syll, size=3)).capitalize() for _ in range(2))
        out.append(EditRequest(prompt=RELATIONS[i % len(RELATIONS)], subject=subject,
                               target_new="".join(rng.choice(syll, size=2)).capitalize(),
                               target_true="".join(rng.choice(syll, size=2)).capitalize(), case_id=i))
    return tuple(out)


def peak_memory_bytes() -> tuple[int, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS (host)"


def matmul_rate(n: int, dtype) -> float:
    import jax

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[2] / 1e12


def covariance_all_layers(params, cfg, n_tokens: int, batch: int, length: int, layers_per_pass: int, seed: int = 0):
    """C0 for every layer from random tokens, `layers_per_pass` layers per pass (all: one pass).
    Returns ({layer: C0 (F, F) float32}, seconds of the timed pass(es), compile seconds, tokens)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxedit.editing import covariance

    steps = max(1, -(-n_tokens // (batch * length)))
    rng = np.random.default_rng(seed)
    mask = jnp.ones((batch, length), jnp.int32)
    accumulate = jax.jit(lambda total, sums: total + sums, donate_argnums=(0,))
    groups = [list(range(s, min(s + layers_per_pass, cfg.num_hidden_layers)))
              for s in range(0, cfg.num_hidden_layers, layers_per_pass)]
    # compile (one batch of each group shape), not timed
    t0 = time.perf_counter()
    shapes = {len(g) for g in groups}
    for k in shapes:
        tok = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, length)), jnp.int32)
        jax.block_until_ready(covariance.covariance_pass.lower(params, cfg, tok, mask,
                                                               jnp.arange(k, dtype=jnp.int32)).compile())
    compile_s = time.perf_counter() - t0
    out = {}
    t0 = time.perf_counter()
    for g in groups:
        total = jnp.zeros((len(g), cfg.intermediate_size, cfg.intermediate_size), jnp.float32)
        for _ in range(steps):
            tok = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, length)), jnp.int32)
            sums, _ = covariance.covariance_pass(params, cfg, tok, mask, jnp.asarray(g, jnp.int32))
            total = accumulate(total, sums)
        total = jax.block_until_ready(total / (steps * batch * length))
        for j, layer in enumerate(g):
            out[layer] = total[j]
        del total
    return out, time.perf_counter() - t0, compile_s, steps * batch * length


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", "--tiny", action="store_true", dest="dry",
                   help="every stage on a tiny bfloat16 config, 2 value steps: seconds on a CPU")
    p.add_argument("--n", type=int, default=None, help="requests (default 1024; dry 4)")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["memit", "emmet"])
    p.add_argument("--v_num_grad_steps", type=int, default=None, help="default 25 (dry 2)")
    p.add_argument("--value_chunk", type=int, default=None, help="requests per value-optimisation call (default 64; dry 4)")
    p.add_argument("--cov_tokens", type=int, default=None, help="default 1,000,000 (dry 4096)")
    p.add_argument("--cov_batch", type=int, default=None, help="default 8 (dry 4)")
    p.add_argument("--cov_length", type=int, default=None, help="default 2048 (dry 64)")
    p.add_argument("--cov_layers_per_pass", type=int, default=None, help="default: all layers in one pass")
    p.add_argument("--skip_cov", action="store_true", help="use a random SPD C0 instead of the corpus pass")
    p.add_argument("--matmul", type=int, default=None, help="matmul size for the rate (default 8192; dry 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)

    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks.edit_speed import jaxedit_value_flops, value_batch_shape
    from jaxedit.editing import editor, templates as jtemplates, values as jvalues
    from jaxedit import hparams
    from llama3_flax import config, model

    dry = args.dry
    pick = lambda v, big, small: v if v is not None else (small if dry else big)
    n = pick(args.n, 1024, 4)
    steps = pick(args.v_num_grad_steps, 25, 2)
    chunk = pick(args.value_chunk, 64, 4)
    cov_tokens, cov_batch = pick(args.cov_tokens, 1_000_000, 4096), pick(args.cov_batch, 8, 4)
    cov_length, mm = pick(args.cov_length, 2048, 64), pick(args.matmul, 8192, 256)
    real = config.llama3_8b("bfloat16")
    # The dry run keeps what the real run's code paths depend on: the dtype, grouped-query attention,
    # an untied unembedding; only the sizes shrink.
    cfg = (config.tiny(num_hidden_layers=2, vocab_size=512, dtype=real.dtype,
                       tie_word_embeddings=real.tie_word_embeddings) if dry else real)
    layers_per_pass = args.cov_layers_per_pass or cfg.num_hidden_layers
    device = jax.devices()[0]
    res = {"device": str(device), "platform": device.platform, "config": "dry (tiny)" if dry else "llama3_8b",
           "dtype": cfg.dtype, "n": n, "layer": args.layer, "v_num_grad_steps": steps, "value_chunk": chunk,
           "seconds": {}, "compile_seconds": {}}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    init = jax.jit(model.init_params, static_argnums=0)  # on the device, as at 8B scale
    params = jax.block_until_ready(init(cfg, jax.random.PRNGKey(args.seed)))
    res["seconds"]["init_params"] = time.perf_counter() - t0
    log(f"params ready ({model.num_params(params) / 1e9:.2f}B) in {res['seconds']['init_params']:.1f}s")
    tok = WordTokenizer(cfg.vocab_size)
    requests = synthetic_requests(n, args.seed)

    # context templates (generation; the first call compiles)
    spec = hparams.reference_templates("memit")
    t0 = time.perf_counter()
    jtemplates.generate_context_templates(params, cfg, tok, spec)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = jtemplates.generate_context_templates(params, cfg, tok, spec)
    res["seconds"]["templates"] = time.perf_counter() - t0
    res["compile_seconds"]["templates"] = max(0.0, first - res["seconds"]["templates"])

    # C0 for all layers in one pass
    if args.skip_cov:
        f = cfg.intermediate_size
        a = jax.random.normal(jax.random.PRNGKey(1), (f, 2 * f), jnp.float32)
        C_all = {args.layer: a @ a.T / (2 * f)}
        res["seconds"]["C0"] = None
    else:
        log(f"C0 of {cfg.num_hidden_layers} layers over {cov_tokens} tokens ({layers_per_pass} layers per pass) ...")
        C_all, secs, comp, used = covariance_all_layers(params, cfg, cov_tokens, cov_batch, cov_length,
                                                        layers_per_pass, args.seed)
        res["seconds"]["C0_all_layers"], res["compile_seconds"]["C0"] = secs, comp
        res["cov_tokens"] = used
        res["C0_tokens_per_s"] = used / secs
        log(f"  {secs:.1f}s ({used / secs:.0f} tokens/s), compile {comp:.1f}s")
    C = {args.layer: C_all[args.layer]}
    del C_all

    hp0 = hparams.EditHparams(method=args.methods[0], layers=(args.layer,), templates=spec,
                              value=hparams.ValueHparams(v_num_grad_steps=steps))
    # values: compiled ahead of time for the chunk shapes, then timed
    log(f"values for {n} requests in chunks of {chunk} ...")
    comp, seen = 0.0, set()
    for s in range(0, n, chunk):
        b = jvalues.build_value_batch(tok, requests[s:s + chunk], jtemplates.flat(g))
        key = tuple(x.shape for x in jax.tree_util.tree_leaves(b))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        jvalues.lower_values(params, cfg, b, args.layer, hp0.value, "resid").compile()
        comp += time.perf_counter() - t0
    t0 = time.perf_counter()
    vals = jax.block_until_ready(editor.edit_values(params, cfg, tok, requests, hp0, templates=g, chunk_size=chunk))
    res["seconds"]["values"] = time.perf_counter() - t0
    res["compile_seconds"]["values"] = comp
    flops = 0
    for s in range(0, n, chunk):
        part = vals.steps[s:s + chunk]
        shape = value_batch_shape(tok, requests[s:s + chunk], g)
        flops += jaxedit_value_flops(cfg, args.layer, shape, int(jnp.max(part)) + 1)["total"]
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    rate = matmul_rate(mm, dtype)
    res["value_tflop"] = flops / 1e12
    res["value_tflops_per_s"] = flops / res["seconds"]["values"] / 1e12
    res["matmul_tflops_per_s"] = rate
    res["matmul"] = f"{mm}x{mm} {jnp.dtype(dtype).name}"
    res["mean_value_steps"] = float(jnp.mean(vals.steps))
    log(f"  {res['seconds']['values']:.1f}s, {res['value_tflops_per_s']:.2f} TFLOP/s of {rate:.2f} (matmul)")

    for m in args.methods:
        hp = dataclasses.replace(hp0, method=m)
        t0 = time.perf_counter()
        _, first_rep = editor.edit(params, cfg, tok, requests, hp, covariances=C, templates=g, values=vals)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        new, rep = editor.edit(params, cfg, tok, requests, hp, covariances=C, templates=g, values=vals)
        jax.block_until_ready(new["layers"]["down_proj"])
        res["seconds"][f"keys[{m}]"] = rep.seconds["keys"]
        res["seconds"][f"solve[{m}]"] = rep.seconds["solve"]
        res["compile_seconds"][f"keys+solve[{m}]"] = max(0.0, first - (time.perf_counter() - t0))
        res[f"delta_norm[{m}]"] = rep.delta_norms[0]
        res[f"solve_cond[{m}]"] = float(rep.solves[0].cond)
        del new
        log(f"{m}: keys {rep.seconds['keys']:.1f}s, solve {rep.seconds['solve']:.1f}s")
    peak, how = peak_memory_bytes()
    res["peak_memory_gib"], res["peak_memory_source"] = peak / 2 ** 30, how

    print(f"\n{res['config']} ({cfg.dtype}) on {res['device']}: {n} synthetic requests at layer {args.layer}, "
          f"{steps} value steps (mean steps run {res['mean_value_steps']:.1f}), value chunks of {chunk}")
    print(f"| {'stage':<22} | {'seconds':>9} |")
    print(f"|{'-' * 24}|{'-' * 11}|")
    for k, v in res["seconds"].items():
        if v is not None:
            print(f"| {k:<22} | {v:>9.2f} |")
    print("compile seconds (not in the table): " + ", ".join(f"{k} {v:.1f}" for k, v in res["compile_seconds"].items()))
    for m in args.methods:
        tot = res["seconds"]["values"] + res["seconds"][f"keys[{m}]"] + res["seconds"][f"solve[{m}]"]
        print(f"{m}: keys + values + solve {tot:.1f}s ({tot / n * 1000:.1f} ms per request)")
    print(f"value optimisation: {res['value_tflop']:.2f} TFLOP in {res['seconds']['values']:.2f}s = "
          f"{res['value_tflops_per_s']:.2f} TFLOP/s; measured {res['matmul']} matmul {rate:.2f} TFLOP/s "
          f"({100 * res['value_tflops_per_s'] / rate:.0f}%)")
    if "cov_tokens" in res:
        print(f"C0 of all {cfg.num_hidden_layers} layers: {res['cov_tokens']} tokens in "
              f"{res['seconds']['C0_all_layers']:.1f}s ({res['C0_tokens_per_s']:.0f} tokens/s)")
    print(f"peak memory {res['peak_memory_gib']:.2f} GiB ({how})")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
