"""Sizing the all-layers C0 pass for a large model on one accelerator, without weights or a device.

Compiles jaxedit.editing.covariance's per-batch program (_accumulate_pass: the forward to the last requested
layer, the k k^T products added into a donated float32 (Lr, F, F) accumulator) from
jax.ShapeDtypeStruct inputs for the model's config, on the backend at hand, and reads the compiled
program's memory_analysis() (bytes of arguments, output, temporaries) and cost_analysis() (FLOPs).
From the FLOPs of one batch it estimates the whole run (--samples samples of --mean_length tokens,
packed into rows of --max_length slots) at --efficiency of --peak_tflops, and lists which
(rows per batch, layers per pass) settings fit in --device_gib.

On a CPU backend, XLA runs bfloat16 dots in float32 and keeps a float32 copy of the bfloat16
decoder weights among the temporaries (about 26 GiB for Llama-3-8B), which an accelerator with
bfloat16 matmuls does not make; so with a CPU backend the program is also compiled with float32
weights, whose temporaries (float32 activations: an upper bound) stand in for the accelerator's,
added to the bfloat16 arguments ("accelerator GiB"; "fits" uses it).

The analytic FLOP count (benchmarks.c0_speed.c0_flops, causal attention, useful tokens only) is
printed beside XLA's count, which also counts the attention's masked half, elementwise work, and
(in while loops) may count a loop body once; the estimate uses the analytic count scaled to the
slots run.

    python -m benchmarks.c0_gpu_sizing [--model llama3_8b] [--samples 100000] [--max_length 512]
                                       [--rows 8 16 32] [--layers_per_pass 8 16 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def shape_structs(cfg):
    """The parameter pytree as jax.ShapeDtypeStructs in cfg's dtype (no memory)."""
    import jax

    from llama3_flax import model

    shapes = model.param_shapes(cfg)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, cfg.jnp_dtype), shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def compiled_batch(cfg, rows: int, width: int, layers: int, product_dtype: str):
    """(memory_analysis, cost_analysis, compile seconds) of one batch of the all-layers pass."""
    import jax
    import jax.numpy as jnp

    from jaxedit.editing import covariance

    f = cfg.intermediate_size
    sds = jax.ShapeDtypeStruct
    ints = sds((rows, width), jnp.int32)
    t0 = time.perf_counter()
    lowered = covariance._accumulate_pass.lower(sds((layers, f, f), jnp.float32), shape_structs(cfg), cfg, ints, ints,
                                                ints, ints, sds((layers,), jnp.int32), product_dtype)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return compiled.memory_analysis(), dict(cost or {}), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3_8b", help="a llama3_flax.config constructor")
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--max_length", type=int, default=512, help="row width (tokens per sample at most)")
    p.add_argument("--mean_length", type=float, default=None,
                   help="mean tokens per sample (default: max_length, an upper bound)")
    p.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32], help="rows per batch to try")
    p.add_argument("--layers_per_pass", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--product_dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--peak_tflops", type=float, default=989.0, help="H100 SXM dense bfloat16")
    p.add_argument("--efficiency", type=float, default=0.4)
    p.add_argument("--device_gib", type=float, default=80.0)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)

    import jax

    from benchmarks.c0_speed import c0_flops
    from llama3_flax import config

    cfg = getattr(config, args.model)()
    width = args.max_length
    mean = args.mean_length or float(width)
    tokens = args.samples * mean
    rows_needed = int(np.ceil(tokens / width))  # packed rows (full rows when samples fill them)
    n_layers = cfg.num_hidden_layers
    f = cfg.intermediate_size
    print(f"{args.model}: {n_layers} layers, F={f}, dtype {cfg.dtype}; {args.samples} samples x {mean:.0f} tokens "
          f"= {tokens / 1e6:.1f}M tokens in {rows_needed} rows of {width}; products in {args.product_dtype}, "
          f"float32 sums; compiled for {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    results = []
    for layers in args.layers_per_pass:
        for rows in args.rows:
            mem, cost, compile_s = compiled_batch(cfg, rows, width, layers, args.product_dtype)
            temp = mem.temp_size_in_bytes
            if jax.default_backend() == "cpu" and cfg.dtype != "float32":
                temp = compiled_batch(dataclasses.replace(cfg, dtype="float32"), rows, width, layers,
                                      args.product_dtype)[0].temp_size_in_bytes
            # one batch runs every layer up to the pass's last; the passes are run in layer order
            passes = [list(range(s, min(s + layers, n_layers))) for s in range(0, n_layers, layers)]
            batches = int(np.ceil(rows_needed / rows))
            per_batch = [c0_flops(cfg, [width] * rows, g) for g in passes]
            analytic = batches * sum(per_batch)
            seconds = analytic / (args.efficiency * args.peak_tflops * 1e12)
            device_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                            - mem.alias_size_in_bytes)
            accelerator_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
                                 - mem.alias_size_in_bytes)
            row = {"rows": rows, "tokens_per_batch": rows * width, "layers_per_pass": layers, "passes": len(passes),
                   "batches_per_pass": batches, "argument_bytes": mem.argument_size_in_bytes,
                   "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
                   "temp_bytes": mem.temp_size_in_bytes, "device_bytes": device_bytes,
                   "accelerator_temp_bytes": temp, "accelerator_bytes": accelerator_bytes,
                   "xla_flops_batch": float(cost.get("flops", float("nan"))),
                   "analytic_flops_batch_first_pass": per_batch[0], "total_flops": analytic,
                   "hours": seconds / 3600, "compile_s": compile_s,
                   "fits": accelerator_bytes <= args.device_gib * 2 ** 30}
            results.append(row)
            print(f"  rows {rows} x {width}, {layers} layers/pass: {device_bytes / 2 ** 30:.1f} GiB compiled here, "
                  f"{accelerator_bytes / 2 ** 30:.1f} GiB on an accelerator (args {mem.argument_size_in_bytes / 2 ** 30:.1f}, "
                  f"temp {mem.temp_size_in_bytes / 2 ** 30:.2f} here, {temp / 2 ** 30:.2f} there), "
                  f"XLA {row['xla_flops_batch'] / 1e12:.2f} TFLOP/batch vs analytic {per_batch[0] / 1e12:.2f}; "
                  f"{analytic / 1e18:.3f} EFLOP in all, {seconds / 3600:.2f} h; compiled in {compile_s:.0f}s",
                  flush=True)
    print(f"\n{args.model} C0 for all {n_layers} layers over {args.samples} samples ({tokens / 1e6:.1f}M tokens), "
          f"at {100 * args.efficiency:.0f}% of {args.peak_tflops:.0f} TFLOP/s; memory from memory_analysis "
          f"(arguments + output + temporaries - donated aliases), fits = accelerator GiB <= {args.device_gib:.0f}")
    header = ["rows x width", "layers/pass", "passes", "GiB compiled here", "temp GiB here", "accelerator GiB", "XLA TFLOP/batch", "analytic TFLOP/batch",
              "EFLOP", "hours", "fits"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        print(f"| {r['rows']} x {width} | {r['layers_per_pass']} | {r['passes']} | {r['device_bytes'] / 2 ** 30:.1f} | "
              f"{r['temp_bytes'] / 2 ** 30:.2f} | {r['accelerator_bytes'] / 2 ** 30:.1f} | {r['xla_flops_batch'] / 1e12:.2f} | "
              f"{r['analytic_flops_batch_first_pass'] / 1e12:.2f} | {r['total_flops'] / 1e18:.3f} | {r['hours']:.2f} | "
              f"{'yes' if r['fits'] else 'no'} |")
    fitting = [r for r in results if r["fits"]]
    if fitting:
        best = min(fitting, key=lambda r: (r["hours"], -r["rows"]))
        print(f"chosen: {best['rows']} rows x {width} ({best['tokens_per_batch']} tokens) per batch, "
              f"{best['layers_per_pass']} layers per pass: {best['accelerator_bytes'] / 2 ** 30:.1f} GiB on the accelerator, "
              f"{best['hours']:.2f} h")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
