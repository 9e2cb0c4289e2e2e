"""Forward-pass speed of SmolLM2-135M: llama3_flax (jitted JAX) against transformers (PyTorch), float32.

Both run the same weights (the offline GGUF file, dequantised to float32) on the same random tokens, in
the same process, timed alternately so that load from other processes hits both alike. Reports the
median over repetitions after warm-up, in tokens per second (batch x sequence length / seconds).

PyTorch runs twice: with its default intra-op thread count and with one thread. On a small machine
shared with other busy processes, OpenMP's barrier waits make the multi-threaded small matmuls of a
135M model many times slower than one thread, so the ratio is taken against the faster torch setting.

    python -m benchmarks.forward_speed [--batches 1 32] [--seq 64] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _load():
    import torch
    from transformers import AutoModelForCausalLM

    from llama3_flax import checkpoint

    cfg, params, _ = checkpoint.load_model("smollm2", dtype="float32")
    path = checkpoint.smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return cfg, params, ref


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from llama3_flax import model

    cfg, params, ref = _load()
    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        tokens = rng.integers(3, cfg.vocab_size, size=(batch, args.seq)).astype(np.int32)
        tokens_j = jnp.asarray(tokens)
        tokens_t = torch.from_numpy(tokens.astype(np.int64))

        def run_jax():
            return model.forward(params, cfg, tokens_j).block_until_ready()

        def run_torch(threads):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return ref(input_ids=tokens_t, use_cache=False).logits

        # warm-up (compilation for JAX), and a check that both compute the same thing
        out_j, out_t = run_jax(), run_torch(default_threads)
        err = float(np.linalg.norm(np.asarray(out_j) - out_t.numpy()) / np.linalg.norm(out_t.numpy()))
        del out_j, out_t
        for _ in range(args.warmup - 1):
            run_jax(), run_torch(default_threads)
        run_torch(1)
        times = {"jax": [], "torch": [], "torch1": []}
        for _ in range(args.reps):  # alternate, so background load affects all alike
            times["jax"].append(_time(run_jax))
            times["torch"].append(_time(lambda: run_torch(default_threads)))
            times["torch1"].append(_time(lambda: run_torch(1)))
        torch.set_num_threads(default_threads)
        n = batch * args.seq
        tps = {k: n / statistics.median(v) for k, v in times.items()}
        rows.append((batch, args.seq, tps["jax"], tps["torch"], tps["torch1"],
                     tps["jax"] / max(tps["torch"], tps["torch1"]), err))
        print(f"  batch {batch}: seconds " + ", ".join(f"{k} {[round(x, 3) for x in sorted(v)]}"
                                                     for k, v in times.items()), file=sys.stderr, flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SmolLM2-135M forward, float32, CPU ({os.cpu_count()} cores visible, load average {load:.1f}), "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(attention {ref.config._attn_implementation}); median of {args.reps} after {args.warmup} warm-up")
    t_hdr = f"torch tok/s ({default_threads} thr)"
    header = (f"| {'batch':>5} | {'seq len':>7} | {'JAX tok/s':>10} | {t_hdr:>20} | {'torch tok/s (1 thr)':>19} "
              f"| {'JAX/best torch':>14} | {'logits rel. diff':>16} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for batch, seq, j, t, t1, ratio, err in rows:
        print(f"| {batch:>5} | {seq:>7} | {j:>10.0f} | {t:>20.0f} | {t1:>19.0f} | {ratio:>14.2f} "
              f"| {err:>16.1e} |")


if __name__ == "__main__":
    main()
