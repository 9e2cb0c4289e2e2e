"""jaxedit's programs at real model shapes on this CPU: measured peak memory against the memory plan.

Random bfloat16 weights of the real shapes (no checkpoint): Llama-3.2-1B (llama3_flax.config
llama3_2_1b: 16 layers, d 2048, d_ff 8192, GQA 32/8, llama3 RoPE scaling, tied embeddings) end to end
at MEMIT's layer 1 (the Llama-3-8B preset's layer): C0 of that layer over a WikiText sample, the
values of 4 CounterFact requests (3 value-loop steps), the float64 factor and solve, the edit
(jaxedit.edit with that C0 and those values) and scoring of the edited model. For Llama-3-8B's
shapes, the stages that fit a 24 GB machine: C0 at layer 1 (a 2-layer model of 8B's shapes: layers
after the edited one do not enter C0), the float64 factor at d_ff 14336 and the solve for 1024
keys, and the value loop on a 4-layer model of 8B's shapes (a window of its last 2 layers).

Each program runs in a fresh subprocess, one at a time. The subprocess builds its inputs, compiles
the program ahead of time from shapes alone (jax.ShapeDtypeStruct, as benchmarks.memory_plan does)
and reads the compiled memory analysis (the plan: arguments + outputs + temporaries - donated
aliases, XLA's CPU backend), resets its peak resident memory (/proc/self/clear_refs), runs the
program on the real arrays, and reads the peak (VmHWM). "measured" is that peak minus the resident
memory of an idle process with jax imported and its CPU client started. Stages that are several
programs (the edit, scoring) run once to compile, then again measured; their plan is what they hold
throughout (params, C0) plus the largest of their programs' other bytes.

    python -m benchmarks.real_shapes [--models 1b 8b] [--stages c0 values ...] [--max_gb 19]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
LAYER = 1  # the Llama-3-8B MEMIT preset's edit layer
N_REQUESTS = 4
VALUE_STEPS = 3


# ------------------------------------------------------------------ this process's memory
def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Resets VmHWM to the current resident size (Linux clear_refs 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(run):
    """run() with the peak reset just before it: (its result, seconds, peak RSS bytes during it,
    RSS bytes when it started)."""
    import jax

    release_freed_memory()
    reset_peak()
    before = status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - t0, status_bytes("VmHWM"), before


# ------------------------------------------------------------------ shared inputs
DRY = "JAXEDIT_REAL_SHAPES_DRY"  # set by --dry for the programs' processes


def model_config(model: str):
    """"1b": Llama-3.2-1B; "8b-L": Llama-3-8B's shapes with its first L layers; all bfloat16. With
    --dry, tiny configs of the same layer counts and tying (a check that every program runs)."""
    from llama3_flax import config

    layers = 16 if model == "1b" else int(model.split("-")[1])
    if os.environ.get(DRY):
        return config.tiny(num_hidden_layers=layers, vocab_size=49152, dtype="bfloat16",
                           tie_word_embeddings=model == "1b", max_position_embeddings=512)
    if model == "1b":
        return config.llama3_2_1b("bfloat16")
    return config.llama3_8b("bfloat16").replace(num_hidden_layers=int(model.split("-")[1]))


def random_params(cfg, seed: int = 0):
    """Random weights of cfg's shapes in cfg's dtype (normal, std 0.02; norms 1 + 0.1 normal), one
    leaf at a time, each drawn and cast in one program: no float32 copy of the model is ever made."""
    import jax

    from llama3_flax import model

    shapes = model.param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys):
        norm = "norm" in jax.tree_util.keystr(path)
        draw = jax.jit(lambda k, shape=shape, norm=norm: ((1.0 + 0.1 * jax.random.normal(k, shape)) if norm else
                                                          0.02 * jax.random.normal(k, shape)).astype(cfg.jnp_dtype))
        leaves.append(jax.block_until_ready(draw(key)))
        del draw
    return jax.tree_util.tree_unflatten(treedef, leaves)


def release_freed_memory() -> None:
    """Hands memory that was freed but kept by the C allocator back to the system, so that the
    resident size at a measurement's start holds only live arrays and code."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def edit_hparams():
    from jaxedit import hparams

    hp = hparams.preset("llama3-8b", "memit")
    return hp.replace(value=dataclasses.replace(hp.value, v_num_grad_steps=VALUE_STEPS))


MAX_GB = "JAXEDIT_REAL_SHAPES_MAX_GB"  # set by --max_gb for the programs' processes


class TooLarge(Exception):
    """The plan says the program would not fit --max_gb: it is not run."""


def compiled_plan(lowered):
    """(compiled program, its memory analysis) of a program lowered from shapes (one device). XLA
    drops the arguments a program never reads (C0's pass never reads an untied unembedding) but the
    process holds them all the same: "unread" adds them back to the total."""
    import jax
    import numpy as np

    from benchmarks import memory_plan

    t0 = time.perf_counter()
    compiled = lowered.compile()
    plan = memory_plan.analyse(compiled)
    inputs = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(lowered.args_info))
    unread = max(0, inputs - plan["args"])
    return compiled, {**plan, "unread": unread, "total": plan["total"] + unread, "compile_s": time.perf_counter() - t0}


def check_fits(plan: dict) -> dict:
    """The plan, or TooLarge when its total is past --max_gb (checked before inputs are built)."""
    limit = float(os.environ.get(MAX_GB, "inf")) * GB
    if plan["total"] > limit:
        raise TooLarge(f"plan {plan['total'] / GB:.1f} GB > --max_gb {limit / GB:.1f}")
    return plan


def composite_plan(held: int, programs: dict) -> dict:
    """The plan of a stage of several programs: the bytes it holds throughout plus, of its programs,
    the largest total less the held bytes among its arguments. programs: {name: (analysis, held bytes
    among its arguments)}."""
    extra = {name: a["total"] - h for name, (a, h) in programs.items()}
    worst = max(extra, key=extra.get)
    return {"total": held + extra[worst], "held": held, "largest": worst,
            "programs": {name: a for name, (a, _) in programs.items()},
            "compile_s": sum(a["compile_s"] for a, _ in programs.values())}


def corpus_batches(tok, n_samples: int, max_length: int, batch_size: int):
    from jaxedit.data import corpus, paths
    from jaxedit.editing import covariance, tokenize

    docs = corpus.read_text_corpus(paths.corpus_file("wikitext-103-valid.tokens"))
    samples = corpus.corpus_samples(tok, docs, n_samples, max_length)
    count = sum(len(s) for s in samples)
    return list(covariance._batches(samples, batch_size, tokenize.pad_id(tok), max_length, 64)), count


# ------------------------------------------------------------------ the stages (each in its own process)
def stage_c0(model: str, work: Path, n_samples: int, max_length: int, batch_size: int = 8) -> dict:
    """C0 of one layer: the per-batch corpus program (covariance._accumulate_pass) over every batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import memory_plan
    from jaxedit.editing import covariance

    cfg = model_config(model)
    tok = memory_plan.planning_tokenizer()
    batches, count = corpus_batches(tok, n_samples, max_length, batch_size)
    f, sds = cfg.intermediate_size, jax.ShapeDtypeStruct
    ints = [sds(x.shape, jnp.int32) for x in batches[0]]
    compiled, plan = compiled_plan(covariance._accumulate_pass.lower(
        sds((1, f, f), jnp.float32), memory_plan.param_structs(cfg), cfg, *ints, sds((1,), jnp.int32), "float32"))
    check_fits(plan)
    params = random_params(cfg)
    layer_ids = jnp.asarray([LAYER], jnp.int32)
    setup_peak = status_bytes("VmHWM")

    def run():
        total = jnp.zeros((1, f, f), jnp.float32)
        for b in batches:
            total = compiled(total, params, *(jnp.asarray(x) for x in b), layer_ids)
        return total

    total, secs, peak, before = measure(run)
    if model == "1b":  # the next stages' C0
        c0 = np.asarray(total[0]) / count
        np.save(work / "c0_1b.npy", 0.5 * (c0 + c0.T))
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"{len(batches)} batches of {batch_size} x {batches[0][0].shape[1]} tokens ({count} tokens), "
                     f"F {f}"}


def stage_values(model: str, work: Path) -> dict:
    """The value optimisation (values.optimise_values) of N_REQUESTS requests at LAYER."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import memory_plan
    from jaxedit.editing import values

    cfg = model_config(model)
    hp = edit_hparams()
    batch = memory_plan.value_batch(N_REQUESTS)
    window = values._window(cfg, LAYER)
    compiled, plan = compiled_plan(values.optimise_values.lower(
        memory_plan.param_structs(cfg), cfg, memory_plan._structs(batch), jnp.int32(LAYER), hp.value,
        hp.spec.site, window=window, remat=False))
    check_fits(plan)
    params = random_params(cfg)
    setup_peak = status_bytes("VmHWM")
    vals, secs, peak, before = measure(lambda: compiled(params, batch, jnp.int32(LAYER)))
    if model == "1b":
        np.savez(work / "values_1b.npz", **{k: np.asarray(getattr(vals, k))
                                             for k in ("target", "init", "delta", "loss", "nll", "steps")})
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"{N_REQUESTS} requests, {batch.tokens.shape[0]} prefix rows x {batch.tokens.shape[1]}, "
                     f"{VALUE_STEPS} value-loop steps, window {window} layers",
            "steps_run": np.asarray(vals.steps).tolist()}


def _spd(f: int, rank: int, seed: int = 1):
    """A random symmetric positive definite (F, F) float32 matrix: G G^T / rank + 0.1 I."""
    import jax
    import jax.numpy as jnp

    g = jax.random.normal(jax.random.PRNGKey(seed), (f, rank), jnp.float32)
    return jax.block_until_ready(g @ g.T / rank + 0.1 * jnp.eye(f, dtype=jnp.float32))


def _c0_for(model: str, work: Path):
    import jax.numpy as jnp
    import numpy as np

    cfg = model_config(model)
    if model == "1b":
        return jnp.asarray(np.load(work / "c0_1b.npy"))
    return _spd(cfg.intermediate_size, 1024)


def stage_factor(model: str, work: Path) -> dict:
    """The float64 Cholesky factor of C0 (pm._factor, replicated)."""
    import jax

    from benchmarks import memory_plan

    cfg = model_config(model)
    f = cfg.intermediate_size
    compiled, plan = compiled_plan(memory_plan.factor_program(f))
    check_fits(plan)
    c0 = _c0_for(model, work)
    setup_peak = status_bytes("VmHWM")
    with jax.enable_x64(True):
        out, secs, peak, before = measure(lambda: compiled(c0, 1e-6, 0.0))
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"{f} x {f}", "factored": bool(out.factored), "cond": float(out.cond)}


def stage_solve(model: str, work: Path, n_keys: int) -> dict:
    """The float64 solve (pm._pm_solve) of n_keys keys with a factored C0."""
    import jax
    import jax.numpy as jnp

    from benchmarks import memory_plan
    from jaxedit.editing import pm

    cfg = model_config(model)
    f, d = cfg.intermediate_size, cfg.hidden_size
    compiled, plan = compiled_plan(memory_plan.solve_program(f, d, n_keys))
    check_fits(plan)
    factor = pm.factor_preservation(_c0_for(model, work))
    keys = jax.random.normal(jax.random.PRNGKey(2), (f, n_keys), jnp.float32)
    residuals = jax.random.normal(jax.random.PRNGKey(3), (d, n_keys), jnp.float32)
    jax.block_until_ready((factor, keys, residuals))
    setup_peak = status_bytes("VmHWM")
    with jax.enable_x64(True):
        (delta, report), secs, peak, before = measure(
            lambda: compiled(factor, keys, residuals, 0.0, None, pm.DEFAULT_MAX_COND, None))
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"F {f}, {n_keys} keys", "finite": bool(jnp.all(jnp.isfinite(delta)))}


def _one_b_requests_and_values(params, cfg, work: Path):
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import memory_plan
    from jaxedit.cache import model_fingerprint
    from jaxedit.editing.values import Values, ValuesFor, request_digest

    requests = memory_plan.value_requests(N_REQUESTS)
    with np.load(work / "values_1b.npz") as z:
        made_for = ValuesFor(model=model_fingerprint(params, cfg), layer=LAYER, site="resid",
                             requests=tuple(request_digest(r) for r in requests))
        return requests, Values(**{k: jnp.asarray(z[k]) for k in z.files}, made_for=made_for)


def stage_edit(model: str, work: Path) -> dict:
    """jaxedit.edit with the C0 and values of the earlier stages: keys, factor, solve, update."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import memory_plan
    from jaxedit.editing import editor, keys as jkeys, tokenize

    cfg = model_config(model)
    hp = edit_hparams()
    tok = memory_plan.planning_tokenizer()
    params = random_params(cfg)
    requests, vals = _one_b_requests_and_values(params, cfg, work)
    c0 = _c0_for(model, work)
    f, d, sds = cfg.intermediate_size, cfg.hidden_size, jax.ShapeDtypeStruct
    flat = [t for g in memory_plan.VALUE_TEMPLATES for t in g]
    ids, last = jkeys.subject_rows(tok, requests, flat)
    tokens, mask, last = jkeys.pad_rows(ids, last, tokenize.pad_id(tok))
    pstructs = memory_plan.param_structs(cfg)
    ints = lambda a: sds(np.shape(a), jnp.int32)
    w = params["layers"]["down_proj"]
    programs = {
        "keys": (compiled_plan(jkeys._capture.lower(pstructs, cfg, ints(tokens), ints(mask), sds((1,), jnp.int32),
                                                     sds((len(last), 1), jnp.int32)))[1], nbytes(params)),
        "factor": (compiled_plan(memory_plan.factor_program(f))[1], nbytes(c0)),
        "solve": (compiled_plan(memory_plan.solve_program(f, d, N_REQUESTS))[1], 0),
        "update": (compiled_plan(jax.jit(lambda w, dw: w.at[LAYER].add(dw.astype(w.dtype))).lower(
            sds(w.shape, w.dtype), sds((d, f), jnp.float32)))[1], nbytes(w)),
    }
    plan = check_fits(composite_plan(nbytes(params) + nbytes(c0) + nbytes(vals), programs))
    groups = memory_plan.VALUE_TEMPLATES
    run = lambda: editor.edit(params, cfg, tok, requests, hp, covariances={LAYER: c0}, templates=groups, values=vals)
    jax.block_until_ready(run())  # compiles
    setup_peak = status_bytes("VmHWM")
    (new, report), secs, peak, before = measure(run)
    dw = np.asarray(new["layers"]["down_proj"][LAYER].astype(jnp.float32) - w[LAYER].astype(jnp.float32))
    np.save(work / "delta_1b.npy", dw)
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"{N_REQUESTS} requests x {len(flat)} templates, F {f}",
            "delta_norm": report.delta_norms[0], "stage_seconds": report.seconds}


def stage_score(model: str, work: Path, n_cases: int = 32) -> dict:
    """jaxedit.evaluate of the edited model (the edit stage's change) on n_cases CounterFact cases."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import memory_plan
    from jaxedit.editing import editor
    from jaxedit.eval import metrics, scoring

    cfg = model_config(model)
    tok = memory_plan.planning_tokenizer()
    params = random_params(cfg)
    edited = editor.add_to_down_proj(params, LAYER, jnp.asarray(np.load(work / "delta_1b.npy")))
    del params
    cases = memory_plan.value_requests(n_cases)
    sds = jax.ShapeDtypeStruct
    rows, flat = sds((16, 64), jnp.int32), sds((256,), jnp.int32)
    # the largest call evaluate makes (16 rows of 64 slots; predictors and scored tokens padded to 256)
    plan = compiled_plan(scoring.score_tree_rows.lower(memory_plan.param_structs(cfg), cfg, rows, rows, rows,
                                                       flat, flat, flat))[1]
    check_fits({**plan, "total": plan["total"] + nbytes(edited["layers"]["down_proj"])})
    run = lambda: metrics.evaluate(edited, cfg, tok, cases, progress=False).aggregate.es
    run()  # compiles
    setup_peak = status_bytes("VmHWM")
    es, secs, peak, before = measure(run)
    return {"plan": plan, "seconds": secs, "peak": peak, "rss_before": before, "setup_peak": setup_peak,
            "shape": f"{n_cases} cases ({3 * n_cases} prompts x 2 targets), calls of <= 16 rows x 64"}


def stage_baseline(model: str, work: Path) -> dict:
    """An idle process with jax imported and its CPU client started."""
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.zeros(()) + 1)
    return {"rss": status_bytes("VmRSS"), "peak": status_bytes("VmHWM")}


# (model, stage, description, call)
PROGRAMS = [
    ("1b", "c0", "C0 of layer 1, 64 WikiText samples of <= 256 tokens", lambda m, w: stage_c0(m, w, 64, 256)),
    ("1b", "values", "values of 4 requests at layer 1, 3 steps", stage_values),
    ("1b", "factor", "float64 factor of that C0", stage_factor),
    ("1b", "solve", "float64 solve, 4 keys", lambda m, w: stage_solve(m, w, N_REQUESTS)),
    ("1b", "edit", "MEMIT edit of the 4 requests (keys, factor, solve, update)", stage_edit),
    ("1b", "score", "scoring the edited model, 32 cases", stage_score),
    ("8b-2", "c0", "C0 of layer 1, 16 WikiText samples of <= 256 tokens", lambda m, w: stage_c0(m, w, 16, 256)),
    ("8b-2", "factor", "float64 factor, d_ff 14336", stage_factor),
    ("8b-2", "solve", "float64 solve, 1024 keys, d_ff 14336", lambda m, w: stage_solve(m, w, 1024)),
    ("8b-4", "values", "values of 4 requests at layer 1, 3 steps (4-layer model: window of 2)",
     stage_values),
]
MODEL_NAMES = {"1b": "Llama-3.2-1B", "8b-2": "Llama-3-8B shapes, layers 0-1", "8b-4": "Llama-3-8B shapes, 4 layers"}


# ------------------------------------------------------------------ the driver
def run_stage(model: str, stage: str, work: Path, timeout: float, dry: bool = False) -> dict:
    """Runs one program in a fresh subprocess; its result dict ("error" if it failed, "skipped" if its
    plan is past --max_gb)."""
    work = work / "dry" if dry else work
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{model}_{stage}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    env.pop(DRY, None)
    if dry:
        env[DRY] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_shapes", "--run", model, stage, "--work", str(work)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": time.perf_counter() - t0}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}


def table(rows: list[dict], baseline: dict, load: tuple) -> str:
    """The markdown table of the programs' plans and measurements."""
    lines = [f"Peak resident memory of each program, measured in a fresh process (minus an idle jax process's "
             f"{baseline['rss'] / GB:.2f} GB), against its plan compiled from shapes on XLA's CPU backend; "
             f"bfloat16 weights, float32 sums, float64 factor and solve; load average {load[0]:.2f} / "
             f"{load[1]:.2f} / {load[2]:.2f} (`uptime`: other jobs shared the 2 cores, so seconds are "
             "inflated). \"overhead\": the same program's measured memory on a tiny config (the process's "
             "modules, tokenizer, compiled code and allocator pools; none of it in the plan).", "",
             "| model | program | shapes | plan GB | measured GB | overhead GB | measured / plan | seconds | "
             "compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"| {MODEL_NAMES[r['model']]} | {r['description']} |"
        if "error" in r or "skipped" in r:
            lines.append(f"{name} | | {'failed' if 'error' in r else r['skipped']} | | | | | |")
            continue
        measured, plan = r["peak"] - baseline["rss"], r["plan"]["total"]
        over = r.get("overhead")
        lines.append(f"{name} {r['shape']} | {plan / GB:.2f} | {measured / GB:.2f} | "
                     f"{'' if over is None else f'{over / GB:.2f}'} | {measured / plan:.2f} | {r['seconds']:.1f} | "
                     f"{r['plan']['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["1b", "8b"], help="1b, 8b")
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (c0 values factor solve edit score)")
    p.add_argument("--work", default=None, help="folder for the stages' hand-over files and results")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per program")
    p.add_argument("--max_gb", type=float, default=19.0, help="skip a program whose plan is larger (resident GB)")
    p.add_argument("--no_overhead", action="store_true", help="skip the tiny-config runs that measure each "
                   "program's fixed overhead")
    p.add_argument("--dry", action="store_true", help="every program on tiny configs (seconds): a check that all run")
    p.add_argument("--json_out", default=None)
    p.add_argument("--run", nargs=2, metavar=("MODEL", "STAGE"), help=argparse.SUPPRESS)  # one program (subprocess)
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="real_shapes_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ[MAX_GB] = str(args.max_gb)
    if args.run:
        model, stage = args.run
        call = stage_baseline if stage == "baseline" else next(c for m, s, _, c in PROGRAMS if (m, s) == (model, stage))
        try:
            res = call(model, work)
        except TooLarge as e:
            res = {"skipped": str(e)}
        (work / f"{model}_{stage}.json").write_text(json.dumps(res, default=float))
        return res

    baseline = run_stage("none", "baseline", work, 300)
    print(f"idle jax process: {baseline['rss'] / GB:.2f} GB resident; work folder {work}", flush=True)
    rows, loads = [], []
    for model, stage, description, _ in PROGRAMS:
        if model.split("-")[0] not in args.models or (args.stages and stage not in args.stages):
            continue
        r = {"model": model, "stage": stage, "description": description,
             **run_stage(model, stage, work, args.timeout, dry=args.dry)}
        loads.append(os.getloadavg())
        if not args.dry and not args.no_overhead and "peak" in r:
            tiny = run_stage(model, stage, work, args.timeout, dry=True)
            r["overhead"] = tiny["peak"] - baseline["rss"] if "peak" in tiny else None
        rows.append(r)
        if "error" in r or "skipped" in r:
            print(f"{MODEL_NAMES[model]} {stage}: {r.get('skipped') or 'failed'}\n{r.get('error', '')}", flush=True)
        else:
            print(f"{MODEL_NAMES[model]} {stage}: plan {r['plan']['total'] / GB:.2f} GB, measured "
                  f"{(r['peak'] - baseline['rss']) / GB:.2f} GB, {r['seconds']:.1f}s", flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1, default=float))
    load = tuple(max(x[i] for x in loads) for i in range(3)) if loads else os.getloadavg()
    print()
    print(table(rows, baseline, load))
    return rows


if __name__ == "__main__":
    main()
