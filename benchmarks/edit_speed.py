"""Editing speed on SmolLM2-135M (float32, CPU): jaxedit's stages, and jaxedit against the PyTorch baseline.

(a) jaxedit seconds per stage (templates, C0, keys, values, solve) for MEMIT batches of 1, 8 and 32
    requests. Every stage is timed warm: the value optimisation is compiled ahead of time for the
    exact shapes, the other stages run once before the timed run; compile seconds are listed apart.
(b) MEMIT batch 32 at one layer, end to end (keys + values + solve): jaxedit against the PyTorch
    baseline (baselines.torch_reference: one request at a time, the full model at every Adam step, the
    way the reference implementations work). The baseline's keys and solve run on all requests; its
    value optimisation, linear in the number of requests, runs on --torch_value_requests of them and is
    scaled to the batch by loss evaluations (the baseline evaluates the loss steps + 1 times per
    request; jaxedit's per-request step counts, which equal the baseline's (experiments/compare_torch),
    give the evaluations of the requests not run). --torch_value_requests=32 measures all of them.
(c) Scoring CounterFact prompts: jaxedit.eval.metrics.evaluate (prefix-tree rows, unembedding only where
    a target token is predicted) against one PyTorch forward per prompt (its two target continuations
    as a batch of 2), on the same cases, each in float32 and with bfloat16 matmuls (jaxedit: bfloat16
    decoder matrices under float32 activations; PyTorch: the model in bfloat16). Every scorer's NLLs
    are compared with PyTorch float32's, and so are its new-vs-true decisions (what ES/PS/NS count).
    For each --score_cases count, --score_repeats rounds run the four scorers back to back, and
    speed ratios are taken within a round (median and range), so drift in the machine speed cancels.
(d) The value optimisation's FLOPs (analytic count, below) per second achieved by each implementation,
    against the measured rate of a large float32 matmul in JAX (and in PyTorch).

PyTorch runs at its default thread count unless --torch_threads says otherwise: on a small machine
shared with other busy processes, 1 thread can be much faster (OpenMP barriers stall multi-threaded
small matmuls), on a quiet one the default is PyTorch's best.

    python -m benchmarks.edit_speed [--batches 1 8 32] [--torch_value_requests 8] [--score_cases 64 256]
                                    [--score_repeats 3]
                                    [--torch_threads 0]
                                    [--skip a c] [--json_out runs/edit_speed.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import sys
import time
from pathlib import Path

import numpy as np

from jaxedit import packing
from jaxedit.data import paths
from jaxedit.hparams import CovarianceHparams



# =============================================================================== FLOP model
def linear_flops_per_token(cfg) -> int:
    """Matmul FLOPs of one decoder layer per token, without attention scores (2 per multiply-add)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return 2 * d * (q + 2 * kv) + 2 * q * d + 3 * 2 * d * f


def attention_flops_per_token(cfg, context: int) -> int:
    """QK^T and AV FLOPs of one layer for one query token over `context` key slots."""
    return 4 * cfg.num_attention_heads * cfg.head_dim * context


def jaxedit_value_flops(cfg, layer: int, shape: dict, iterations: int) -> dict:
    """FLOPs of jaxedit.editing.values.optimise_values for one chunk of `value_batch_shape`'s shape.

    rows x t: the padded token batch; slots: token slots recomputed per step (the rows' suffixes from
    the subject's last token, packed into lanes); cache: key slots per lane; target_slots: scored slots
    per row; n: requests; iterations: while-loop iterations (= the most loss evaluations of any
    request). Each iteration runs the recomputed slots through the layers after `layer` over the
    cache, unembeds the scored slots, and back-propagates to the delta (activation gradients only:
    about the forward's FLOPs again). Once: a pass over all tokens through every layer (prefix up to
    `layer`, cache fill after it); the reference KL distribution comes from the first iteration.
    """
    after = cfg.num_hidden_layers - 1 - layer
    unembed = 2 * cfg.hidden_size * cfg.vocab_size
    rows, t = shape["rows"], shape["t"]
    forward = (shape["slots"] * after * (linear_flops_per_token(cfg)
                                         + attention_flops_per_token(cfg, shape["cache"]))
               + unembed * (shape["target_slots"] + shape["n"]))
    once = rows * t * cfg.num_hidden_layers * (linear_flops_per_token(cfg) + attention_flops_per_token(cfg, t // 2))
    return {"per_iteration": 2 * forward, "once": once, "total": once + iterations * 2 * forward}


def torch_value_flops(cfg, layer: int, rows: int, t: int, evaluations: int) -> dict:
    """FLOPs of the PyTorch baseline's value optimisation of one request: each evaluation runs the
    full model on rows x t tokens (logits at every position), the backward pass goes from the logits to
    the delta at `layer` (activation gradients of the layers after it and of the unembedding)."""
    after = cfg.num_hidden_layers - 1 - layer
    unembed = 2 * cfg.hidden_size * cfg.vocab_size
    tokens = rows * t
    per_layer = linear_flops_per_token(cfg) + attention_flops_per_token(cfg, t // 2)
    forward = tokens * (cfg.num_hidden_layers * per_layer + unembed)
    backward = tokens * (after * per_layer + unembed)
    return {"per_evaluation": forward + backward, "total": evaluations * (forward + backward)}


def matmul_rate_jax(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 n x n matmul rate of JAX here, GFLOP/s (median)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e9


def matmul_rate_torch(n: int = 2048, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e9


# =============================================================================== helpers
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _table(header, rows, fmt):
    widths = [max(len(h), *(len(fmt(i, r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.rjust(w) for h, w in zip(header, widths)) + " |"
    out = [line, "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(i, v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(out)


def _num(i, v):
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


def value_batch_shape(tokenizer, requests, templates) -> dict:
    """The sizes of jaxedit's value batch for these requests (see jaxedit_value_flops)."""

    from jaxedit.editing import values as jvalues
    from jaxedit.editing.templates import flat

    b = jvalues.build_value_batch(tokenizer, requests, flat(templates))
    return {"rows": int(b.tokens.shape[0]), "t": int(b.tokens.shape[1]), "slots": b.lanes.tokens,
            "cache": int(b.lanes.cache_row.shape[1]), "target_slots": int(b.target_ids.shape[0]), "n": len(requests)}


def torch_value_rows(tokenizer, request, templates):
    """(rows, padded length) of the baseline's value batch for one request."""
    from baselines import torch_reference as tb
    from jaxedit.editing.templates import flat

    tgt = tb.target_ids(tokenizer, request.target_new)
    lengths = [len(tb._ids(tokenizer, tb.fill_template(t, request.prompt, request.subject)[1])) + len(tgt) - 1
               for t in flat(templates)]
    lengths.append(len(tb._ids(tokenizer, tb.KL_PROMPT.format(request.subject))))
    return len(lengths), max(lengths)


# =============================================================================== parts
def part_a(ctx, args):
    """jaxedit per stage for each batch size (MEMIT)."""
    import jax

    from benchmarks.stages import jaxedit_edit, jaxedit_values
    from jaxedit.editing import covariance, pm, templates as jtemplates

    params, cfg, tok, hp, g, C, reqs = (ctx[k] for k in ("params", "cfg", "tok", "hp", "templates", "C", "requests"))
    res = {"batches": {}, "compile": {}}
    # templates: generation (first call compiles)
    _, first = _timed(lambda: jtemplates.generate_context_templates(params, cfg, tok, hp.templates))
    _, warm = _timed(lambda: jtemplates.generate_context_templates(params, cfg, tok, hp.templates))
    res["templates"], res["compile"]["templates"] = warm, max(0.0, first - warm)
    # C0: one corpus pass for the edited layer, no cache
    spec = CovarianceHparams(corpus=ctx["corpus"], n_samples=args.cov_samples, max_length=128)
    cov = lambda: jax.block_until_ready(covariance.preservation_covariance(
        params, cfg, tok, list(hp.layers), spec, cache_dir=None, progress=False))
    _, first = _timed(cov)
    _, warm = _timed(cov)
    res["C0"], res["compile"]["C0"] = warm, max(0.0, first - warm)
    # the float64 factor of C0, once per layer (editor.edit accepts it in place of C0)
    factor = lambda: {l: jax.block_until_ready(pm.factor_preservation(c)) for l, c in C.items()}
    _, first = _timed(factor)
    P, warm = _timed(factor)
    res["factor"], res["compile"]["factor"] = warm, max(0.0, first - warm)
    for b in args.batches:
        batch = reqs[:b]
        print(f"(a) batch {b}: values ...", file=sys.stderr, flush=True)
        vals, t_values, c_values = jaxedit_values(params, cfg, tok, batch, hp, g, warmup=True)
        print(f"(a) batch {b}: values {t_values:.1f}s (compile {c_values:.1f}s); keys + solve ...",
              file=sys.stderr, flush=True)
        _, report, c_ks = jaxedit_edit(params, cfg, tok, batch, hp, C, g, vals, warmup=True)
        _, cached, _ = jaxedit_edit(params, cfg, tok, batch, hp, P, g, vals, warmup=False)
        res["batches"][b] = {"keys": report.seconds["keys"], "values": t_values, "solve": report.seconds["solve"],
                             "solve_cached_factor": cached.seconds["solve"],
                             "compile_values": c_values, "compile_keys_solve": c_ks,
                             "steps": [int(s) for s in jax.device_get(vals.steps)],
                             "shape": value_batch_shape(tok, batch, g)}
        if b == max(args.batches):
            ctx["jax_values_full"] = vals
    return res


def part_b(ctx, args, a_res):
    """MEMIT at the largest batch: jaxedit end to end vs the PyTorch baseline."""
    import numpy as np

    from benchmarks.stages import jaxedit_edit, jaxedit_values
    from baselines import torch_reference as tb
    from jaxedit.editing.templates import flat

    params, cfg, tok, hp, g, C, reqs = (ctx[k] for k in ("params", "cfg", "tok", "hp", "templates", "C", "requests"))
    b = max(args.batches)
    batch = reqs[:b]
    if a_res is not None and b in a_res["batches"]:
        jx = a_res["batches"][b]
        vals = ctx["jax_values_full"]
    else:
        vals, t_values, c_values = jaxedit_values(params, cfg, tok, batch, hp, g, warmup=True)
        _, report, c_ks = jaxedit_edit(params, cfg, tok, batch, hp, C, g, vals, warmup=True)
        jx = {"keys": report.seconds["keys"], "values": t_values, "solve": report.seconds["solve"],
              "steps": [int(s) for s in np.asarray(vals.steps)]}
    model = ctx["torch_model"]
    k = min(args.torch_value_requests or b, b)
    print(f"(b) PyTorch values for {k} of {b} requests ...", file=sys.stderr, flush=True)
    tv, t_sub = _timed(lambda: tb.values(model, tok, batch[:k], list(flat(g)), hp.layers[-1], hp.value))
    evals_sub = int(np.sum(tv.steps + 1))
    jax_steps = np.asarray(jx["steps"])
    evals_all = evals_sub + int(np.sum(jax_steps[k:] + 1))
    t_values = t_sub * evals_all / evals_sub
    print(f"(b) PyTorch values {t_sub:.1f}s for {k}; keys + solve for {b} ...", file=sys.stderr, flush=True)
    # keys and solve on all requests (the values' content does not change their cost)
    given = tb.TorchValues(target=np.asarray(vals.target), init=np.asarray(vals.init), delta=np.asarray(vals.delta),
                           loss=np.asarray(vals.loss), steps=np.asarray(vals.steps))
    te = tb.edit(model, tok, batch, hp, covariances=C, templates=g, given_values=given)
    tt = {"keys": te.seconds["keys"], "values": t_values, "solve": te.seconds["solve"]}
    return {"batch": b, "jaxedit": {s: jx[s] for s in ("keys", "values", "solve")}, "torch": tt,
            "torch_values_measured": {"requests": k, "seconds": t_sub, "evaluations": evals_sub,
                                      "steps": tv.steps.tolist(),
                                      "jaxedit_steps_same_requests": jax_steps[:k].tolist()},
            "torch_evaluations_all": evals_all, "extrapolated": k < b}


def _decisions_changed(nll, reference) -> int:
    """Prompts where "new beats true" (the ES/PS/NS comparison) differs from the reference's."""
    return int(np.sum((nll[:, 0] < nll[:, 1]) != (reference[:, 0] < reference[:, 1])))


def part_c(ctx, args):
    """Scoring CounterFact prompts, for each of --score_cases."""
    return [score_comparison(ctx, n, args.score_repeats) for n in args.score_cases]


def score_comparison(ctx, n_cases: int, rounds: int) -> dict:
    """jaxedit and PyTorch scorers, each in float32 and with bfloat16 matmuls, on the first n_cases.

    The four scorers run back to back in each of `rounds` rounds, and speed ratios are taken within
    a round: on a shared VM whose speed drifts by 10-30% over minutes, a ratio of two runs minutes
    apart measures the drift as much as the code.
    """
    import copy

    import jax.numpy as jnp
    import torch

    from jaxedit.eval import metrics
    from baselines import torch_reference as tb
    from llama3_flax import model as lm_model

    params, cfg, tok = ctx["params"], ctx["cfg"], ctx["tok"]
    cases = ctx["requests"][:n_cases]
    triples = [(p, r.target_new, r.target_true) for r in cases
               for p in (r.filled_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts)]
    print(f"(c) scoring {len(triples)} prompts x 2 targets, {rounds} round(s) ...", file=sys.stderr, flush=True)

    def jaxedit_nll(p):
        ev = metrics.evaluate(p, cfg, tok, cases, progress=False)
        return np.asarray([pair for c in ev.cases for pair in (*c.rewrite_nll, *c.paraphrase_nll, *c.neighborhood_nll)])

    mixed = lm_model.matrices_as(params, jnp.bfloat16)
    torch_bf16 = copy.deepcopy(ctx["torch_model"]).to(torch.bfloat16)
    scorers = [("jaxedit", "float32", lambda: jaxedit_nll(params)),
               ("jaxedit", "bfloat16 matmuls (matrices_as)", lambda: jaxedit_nll(mixed)),
               ("PyTorch, one forward per prompt", "float32", lambda: tb.score_prompts(ctx["torch_model"], tok, triples)),
               ("PyTorch, one forward per prompt", "bfloat16", lambda: tb.score_prompts(torch_bf16, tok, triples))]
    compile_s = [_timed(fn)[1] if who == "jaxedit" else 0.0 for who, _, fn in scorers]  # PyTorch needs no warm-up
    seconds = [[] for _ in scorers]
    for _ in range(max(1, rounds)):
        nlls = []
        for k, (_, _, fn) in enumerate(scorers):
            nll, t = _timed(fn)
            nlls.append(nll)
            seconds[k].append(t)
    reference, torch32 = nlls[2], np.asarray(seconds[2])  # PyTorch float32
    rows = []
    for (who, precision, _), nll, s, c in zip(scorers, nlls, seconds, compile_s):
        ratio = torch32 / np.asarray(s)
        rows.append({"who": who, "precision": precision, "seconds": min(s), "seconds_per_round": s,
                     "ratio_median": float(np.median(ratio)), "ratio_min": float(ratio.min()),
                     "ratio_max": float(ratio.max()), "compile": max(0.0, c - min(s)),
                     "max_abs_nll_diff": float(np.max(np.abs(nll - reference))),
                     "decisions_changed": _decisions_changed(nll, reference)})
    bf16_ratio = np.asarray(seconds[3]) / np.asarray(seconds[1])
    return {"cases": len(cases), "prompts": len(triples), "rounds": max(1, rounds), "rows": rows,
            "torch_bf16_over_jaxedit_bf16_median": float(np.median(bf16_ratio)),
            **scoring_flops(cfg, tok, triples)}


def scoring_flops(cfg, tok, triples, batch_size: int = 16, row_width: int = 64) -> dict:
    """Forward FLOPs of scoring the (prompt, new, true) triples: jaxedit's packed prefix-tree rows
    (padding rows of the last call included, unembedding once per token that predicts a target token) vs one
    PyTorch forward per prompt (2 rows, logits at every position)."""
    from jaxedit.eval import scoring
    from baselines import torch_reference as tb

    layer = lambda t: cfg.num_hidden_layers * (linear_flops_per_token(cfg) + attention_flops_per_token(cfg, t // 2))
    unembed = 2 * cfg.hidden_size * cfg.vocab_size
    pairs = list(dict.fromkeys((p, t) for p, new, true in triples for t in (new, true)))
    enc = scoring.encode_pairs(tok, pairs)
    seqs = [e.prompt_ids + e.target_ids[:-1] for e in enc]
    width = max(row_width, packing.bucket(max(len(q) for q in seqs), 8))
    rows, paths = scoring.pack_token_trees(seqs, width)
    calls = [min(batch_size, len(rows) - s) for s in range(0, len(rows), batch_size)]
    padded_rows = sum(min(batch_size, packing.bucket(c, 2)) for c in calls)
    # distinct predicting tokens: a prompt's last token predicts both targets' first tokens
    predictors = {(r, path[len(e.prompt_ids) + j - 1]) for e, (r, path) in zip(enc, paths) for j in range(len(e.target_ids))}
    jax_f = padded_rows * width * layer(width) + unembed * len(predictors)
    tree_tokens = sum(len(r.tokens) for r in rows)
    torch_f = 0
    for p, new, true in triples:
        n = len(tb._ids(tok, p))
        t = n + max(len(tb.target_ids(tok, new)), len(tb.target_ids(tok, true)))
        torch_f += 2 * t * (layer(t) + unembed)
    return {"flops_jaxedit": jax_f, "flops_torch": torch_f, "rows_packed": len(rows), "rows_jaxedit": padded_rows,
            "row_width": width,
            "pairs": len(enc), "tree_tokens": tree_tokens, "pair_tokens": sum(len(q) for q in seqs) + len(seqs),
            "torch_tokens": sum(2 * (len(tb._ids(tok, p)) + max(len(tb.target_ids(tok, a)), len(tb.target_ids(tok, b))))
                                for p, a, b in triples)}


def part_d(ctx, args, a_res, b_res):
    cfg, hp = ctx["cfg"], ctx["hp"]
    layer = hp.layers[-1]
    out = {"matmul_jax_gflops": matmul_rate_jax(args.matmul), "matmul_torch_gflops": matmul_rate_torch(args.matmul)}
    rows = []
    if a_res is not None:
        for b, r in a_res["batches"].items():
            n = r["shape"]["n"]
            fl = jaxedit_value_flops(cfg, layer, r["shape"], max(r["steps"]) + 1)
            rows.append({"who": f"jaxedit batch {b}", "tflop": fl["total"] / 1e12, "seconds": r["values"],
                         "gflops": fl["total"] / r["values"] / 1e9, "per_request_tflop": fl["total"] / n / 1e12})
    if b_res is not None:
        m = b_res["torch_values_measured"]
        total = 0
        for r, s in zip(ctx["requests"][:m["requests"]], m["steps"]):
            n_rows, t = torch_value_rows(ctx["tok"], r, ctx["templates"])
            total += torch_value_flops(cfg, layer, n_rows, t, s + 1)["total"]
        rows.append({"who": f"PyTorch ({m['requests']} requests)", "tflop": total / 1e12, "seconds": m["seconds"],
                     "gflops": total / m["seconds"] / 1e9, "per_request_tflop": total / m["requests"] / 1e12})
    out["rows"] = rows
    return out


# =============================================================================== main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--method", default="memit", choices=["memit", "emmet"])
    parser.add_argument("--torch_value_requests", type=int, default=8,
                        help="requests whose baseline value optimisation is run (0: all); scaled to the batch")
    parser.add_argument("--score_cases", type=int, nargs="+", default=[64], help="case counts scored in (c)")
    parser.add_argument("--score_repeats", type=int, default=3,
                        help="rounds of the four scorers in (c); ratios are taken within a round")
    parser.add_argument("--cov_samples", type=int, default=200)
    parser.add_argument("--v_num_grad_steps", type=int, default=None, help="override (both implementations)")
    parser.add_argument("--matmul", type=int, default=2048, help="size of the matmul whose rate is measured")
    parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=str(paths.cache_dir()))
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args(argv)

    import jax
    import torch

    from jaxedit.data import counterfact
    from jaxedit.editing import covariance, templates as jtemplates
    from jaxedit import hparams
    from jaxedit.hparams import CovarianceHparams
    from baselines import torch_reference as tb
    from llama3_flax import checkpoint

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    cfg, params, tok = checkpoint.load_model("smollm2")
    hp = hparams.preset("smollm2-135m", args.method)
    if args.v_num_grad_steps:
        hp = hp.replace(value=dataclasses.replace(hp.value, v_num_grad_steps=args.v_num_grad_steps))
    requests = counterfact.load_counterfact("edit", n=max(args.batches + args.score_cases), seed=args.seed)
    corpus = str(counterfact.data_dir() / "corpus" / "wikitext-103-valid.tokens")
    g = jtemplates.context_templates(params, cfg, tok, hp.templates, cache_dir=args.cache_dir)
    spec = CovarianceHparams(corpus=corpus, n_samples=args.cov_samples, max_length=128)
    C = covariance.preservation_covariance(params, cfg, tok, list(hp.layers), spec, cache_dir=args.cache_dir,
                                           progress=False)
    ctx = dict(params=params, cfg=cfg, tok=tok, hp=hp, templates=g, C=C, requests=requests, corpus=corpus,
               torch_model=tb.torch_model(cfg, params))
    results = {"method": hp.method, "layer": hp.layers[-1], "torch_threads": torch.get_num_threads(),
               "jax": jax.__version__, "torch": torch.__version__, "cpus": os.cpu_count()}
    a_res = part_a(ctx, args) if "a" not in args.skip else None
    b_res = part_b(ctx, args, a_res) if "b" not in args.skip else None
    c_res = part_c(ctx, args) if "c" not in args.skip else None
    d_res = part_d(ctx, args, a_res, b_res) if "d" not in args.skip else None
    results.update(a=a_res, b=b_res, c=c_res, d=d_res, seconds=time.perf_counter() - start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"\nSmolLM2-135M {hp.method.upper()} at layer {hp.layers[-1]}, float32, CPU ({os.cpu_count()} cores, "
          f"load average {load:.1f} at the end), jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} thread(s)); {hp.value.v_num_grad_steps} value steps max")
    if a_res:
        print(f"\n(a) jaxedit seconds per stage (warm). Once per model/layer: templates {a_res['templates']:.2f}s, "
              f"C0 ({args.cov_samples} x 128 tokens, one layer) {a_res['C0']:.2f}s, float64 factor of C0 "
              f"{a_res['factor']:.2f}s. Per edit (solve: factoring C0 in the edit / with the cached factor):")
        rows = [(b, r["keys"], r["values"], r["solve"], r["solve_cached_factor"], r["keys"] + r["values"] + r["solve"],
                 (r["keys"] + r["values"] + r["solve"]) / b, float(sum(r["steps"])) / b)
                for b, r in a_res["batches"].items()]
        print(_table(["batch", "keys s", "values s", "solve s", "solve (cached) s", "total s", "s / request",
                      "mean Adam steps"], rows, _num))
        comp = [("templates", a_res["compile"]["templates"]), ("C0", a_res["compile"]["C0"]),
                ("factor", a_res["compile"]["factor"])]
        comp += [(f"values b={b}", r["compile_values"]) for b, r in a_res["batches"].items()]
        comp += [(f"keys+solve b={b}", r["compile_keys_solve"]) for b, r in a_res["batches"].items()]
        print("compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in comp))
    if b_res:
        j, t = b_res["jaxedit"], b_res["torch"]
        rows = [(s, t[s], j[s], t[s] / j[s] if j[s] else float("inf")) for s in ("keys", "values", "solve")]
        tj, tt = sum(j.values()), sum(t.values())
        rows.append(("end to end", tt, tj, tt / tj))
        m = b_res["torch_values_measured"]
        print(f"\n(b) {hp.method.upper()} batch {b_res['batch']} at one layer: PyTorch baseline vs jaxedit (warm)"
              + (f"; PyTorch values measured on {m['requests']} requests ({m['seconds']:.1f}s, "
                 f"{m['evaluations']} loss evaluations) and scaled to {b_res['torch_evaluations_all']} evaluations"
                 if b_res["extrapolated"] else ""))
        print(_table(["stage", "PyTorch s", "jaxedit s", "PyTorch / jaxedit"], rows, _num))
        print(f"Adam steps, PyTorch {m['steps']} vs jaxedit {m['jaxedit_steps_same_requests']} (same requests)")
        if a_res and b_res["batch"] in a_res["batches"]:
            r = a_res["batches"][b_res["batch"]]
            tj2 = r["keys"] + r["values"] + r["solve_cached_factor"]
            print(f"with C0's factor cached (once per layer): jaxedit {tj2:.2f}s, PyTorch / jaxedit {tt / tj2:.2f}")
    for c in c_res or []:
        j32, jmix, t32, t16 = c["rows"]
        print(f"\n(c) scoring {c['cases']} CounterFact cases ({c['prompts']} prompts x 2 targets), {c['rounds']} "
              f"round(s) of the four scorers back to back: fastest seconds, and the speed ratio per round (median, "
              f"range); NLL differences and changed new-vs-true decisions against PyTorch float32")
        print(_table(["scorer", "precision", "seconds", "prompts / s", "PyTorch float32 / this", "range",
                      "max |NLL diff|", "decisions changed"],
                     [(r["who"], r["precision"], r["seconds"], c["prompts"] / r["seconds"], r["ratio_median"],
                       f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", r["max_abs_nll_diff"], r["decisions_changed"])
                      for r in c["rows"]], _num))
        print(f"PyTorch bfloat16 / jaxedit bfloat16 matmuls {c['torch_bf16_over_jaxedit_bf16_median']:.2f} (median). "
              f"jaxedit compile {j32['compile']:.1f}s (float32), {jmix['compile']:.1f}s (bfloat16 matmuls). "
              f"Tokens run: PyTorch {c['torch_tokens']} (2 rows per prompt, padded to the longer target); "
              f"one sequence per pair {c['pair_tokens']}; jaxedit's prefix trees {c['tree_tokens']} in "
              f"{c['rows_packed']} rows of {c['row_width']} ({c['rows_jaxedit']} with the last call's padding "
              f"rows). Forward FLOPs: PyTorch {c['flops_torch'] / 1e12:.2f} TFLOP "
              f"({c['flops_torch'] / t32['seconds'] / 1e9:.0f} GFLOP/s in float32), jaxedit {c['flops_jaxedit'] / 1e12:.2f} "
              f"TFLOP ({c['flops_jaxedit'] / j32['seconds'] / 1e9:.0f} GFLOP/s in float32)")
    if d_res:
        print(f"\n(d) value optimisation FLOPs vs the measured float32 matmul rate ({args.matmul}^2): "
              f"JAX {d_res['matmul_jax_gflops']:.1f} GFLOP/s, PyTorch {d_res['matmul_torch_gflops']:.1f} GFLOP/s")
        print(_table(["run", "TFLOP", "seconds", "GFLOP/s", "% of JAX matmul", "TFLOP / request"],
                     [(r["who"], r["tflop"], r["seconds"], r["gflops"], 100 * r["gflops"] / d_res["matmul_jax_gflops"],
                       r["per_request_tflop"]) for r in d_res["rows"]], _num))
    print(f"\ntotal benchmark time {results['seconds']:.0f}s")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    return results


if __name__ == "__main__":
    main()
