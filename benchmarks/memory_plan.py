"""Memory plan without the hardware: bytes per device of jaxedit's programs for Llama-3-8B on one
device and Llama-3-70B on a 2x4 mesh, from programs compiled ahead of time from jax.ShapeDtypeStructs.

Every program is the library's own jit function lowered with shape-only inputs (no weights exist):
the value optimisation (jaxedit.editing.values.optimise_values) at a chunk of 1024 requests and at the
default chunk of 64, one C0 batch (covariance._accumulate_pass, the preset's rows and layers per pass),
one scoring call (scoring.score_tree_rows, 16 rows of 64 tokens) and the float64 solve (the Cholesky
factor of C0 and pm_delta for 1024 keys). On the mesh, parameters carry llama3_flax.sharding's rules
and batches go over the data axis; memory_analysis() of the partitioned program is per device.

On a CPU backend XLA runs bfloat16 dots in float32 and keeps float32 copies of bfloat16 weights among
its temporaries, which an accelerator with bfloat16 matmuls does not make; so each program is also
compiled with float32 weights and its temporaries (float32 activations: an upper bound) stand in for
the accelerator's, added to the bfloat16 arguments: "device GiB" = arguments + outputs + those
temporaries - donated aliases, compared with 80 GB (H100) and 141 GB (H200). XLA drops arguments a
program never reads, so C0's pass (which stops before the logits) does not count an untied
unembedding among its arguments; the caller holds it all the same, and it is added back.

    python -m benchmarks.memory_plan   # forces 8 host devices for the 2x4 mesh
"""
from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

GB = 1e9
DEVICES = {"H100 80 GB": 80 * GB, "H200 141 GB": 141 * GB}


def _structs(tree, sharding_tree=None):
    import jax

    if sharding_tree is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding_tree)


def param_structs(cfg, mesh=None):
    """Shape-only params in cfg's dtype, laid out on the mesh by llama3_flax.sharding's rules (mesh
    None: on the default device, unsharded)."""
    import jax

    from llama3_flax import model, sharding

    shapes = model.param_shapes(cfg)
    if mesh is None:
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, cfg.jnp_dtype), shapes,
                                      is_leaf=lambda x: isinstance(x, tuple))
    shardings = sharding.param_shardings(cfg, mesh)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s, cfg.jnp_dtype, sharding=sh), shapes, shardings,
                                  is_leaf=lambda x: isinstance(x, tuple))


def rows_structs(mesh, tree):
    """Shape-only batch arrays with rows over the data axis where they divide (as rows_over_data)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from llama3_flax.sharding import DATA

    def one(x):
        spec = PartitionSpec(DATA) if (x.ndim and x.shape[0] % mesh.shape[DATA] == 0) else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(one, tree)


# MEMIT's template groups: "{}" and 5 ten-token prefixes (fixed text: no generation from random weights)
VALUE_TEMPLATES = (("{}",), tuple(f"The history of the region is long and varied {i}. {{}}" for i in range(5)))


def planning_tokenizer():
    """SmolLM2's tokenizer: its ids fit Llama-3's vocabulary and its token counts are like Llama-3's."""
    from llama3_flax import checkpoint

    return checkpoint.load_tokenizer(checkpoint.smollm2_gguf_path())


def value_requests(n_requests: int):
    """The first n CounterFact "edit" cases of seed 0 ($JAXEDIT_DATA)."""
    from jaxedit.data.counterfact import load_counterfact

    return tuple(load_counterfact("edit", n=n_requests, seed=0))


def value_batch(n_requests: int):
    """A real ValueBatch of n CounterFact requests (SmolLM2's tokenizer: lengths like Llama-3's) with
    MEMIT's templates ("{}" + 5 ten-token prefixes)."""
    from jaxedit.editing import values

    templates = tuple(t for g in VALUE_TEMPLATES for t in g)
    return values.build_value_batch(planning_tokenizer(), value_requests(n_requests), templates)


def _analyse(compiled):
    m = compiled.memory_analysis()
    return {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
            "alias": m.alias_size_in_bytes}


def analyse(compiled) -> dict:
    """A compiled program's memory analysis: args, out, temp, alias and total bytes (args + out + temp
    - alias: what the program needs on the backend it was compiled for)."""
    mem = _analyse(compiled)
    return {**mem, "total": mem["args"] + mem["out"] + mem["temp"] - mem["alias"]}


def unread_unembedding_bytes(cfg, mesh=None) -> int:
    """Bytes per device of an untied unembedding (lm_head): programs that stop before the logits (C0,
    keys) never read it, so XLA drops it from their arguments, but the caller's params hold it all the
    same. 0 for tied embeddings (the embedding is read)."""
    import numpy as np

    if cfg.tie_word_embeddings:
        return 0
    head = param_structs(cfg, mesh)["lm_head"]
    shape = head.shape if mesh is None else head.sharding.shard_shape(head.shape)
    return int(np.prod(shape)) * head.dtype.itemsize


def compile_program(name, build, cfg, mesh, unread: int = 0):
    """build(cfg) -> lowered program; compiled at cfg's dtype and (on CPU) again with float32 weights.
    unread: bytes per device of inputs held but not read by the program (added to its arguments)."""
    import jax

    t0 = time.perf_counter()
    mem = _analyse(build(cfg).compile())
    temp = mem["temp"]
    if jax.default_backend() == "cpu" and cfg.dtype != "float32":
        temp = _analyse(build(dataclasses.replace(cfg, dtype="float32")).compile())["temp"]
    mem["args"] += unread
    total = mem["args"] + mem["out"] + temp - mem["alias"]
    return {"program": name, **mem, "accelerator_temp": temp, "device_bytes": total, "unread": unread,
            "compile_s": time.perf_counter() - t0, "mesh": "x".join(str(v) for v in mesh.shape.values())}


def programs(cfg, mesh, hp):
    """(name, build, bytes per device held but not read) of each program for this model and mesh."""
    import jax
    import jax.numpy as jnp

    from jaxedit.editing import covariance, values
    from jaxedit.eval import scoring

    sds = jax.ShapeDtypeStruct
    layer = hp.layers[-1]
    out = []
    for n, remat in ((1024, False), (1024, True), (256, True), (64, False), (64, True)):
        batch = rows_structs(mesh, _structs(value_batch(n)))
        out.append((f"value optimisation, {n} requests" + (", layers rematerialised" if remat else ""),
                    lambda c, batch=batch, remat=remat: values.optimise_values.lower(
                        param_structs(c, mesh), c, batch, jnp.int32(layer), hp.value, hp.spec.site,
                        window=values._window(c, layer), remat=remat), 0))
    spec = hp.covariance
    f = cfg.intermediate_size
    layers_per_pass = max(1, min(cfg.num_hidden_layers, covariance.DEFAULT_ACCUMULATOR_BYTES // (4 * f * f)))
    ints = rows_structs(mesh, sds((spec.batch_size, spec.max_length), jnp.int32))
    out.append((f"C0 batch, {spec.batch_size} rows x {spec.max_length}, {layers_per_pass} layers/pass",
                lambda c: covariance._accumulate_pass.lower(
                    sds((layers_per_pass, f, f), jnp.float32), param_structs(c, mesh), c, ints, ints, ints, ints,
                    sds((layers_per_pass,), jnp.int32), spec.product_dtype), unread_unembedding_bytes(cfg, mesh)))
    rows = rows_structs(mesh, sds((16, 64), jnp.int32))
    flat = sds((256,), jnp.int32)
    out.append(("scoring, 16 rows x 64 tokens",
                lambda c: scoring.score_tree_rows.lower(param_structs(c, mesh), c, rows, rows, rows, flat, flat, flat),
                0))
    out.append((f"float64 C0 factor ({f} x {f}), replicated", lambda c: factor_program(f), 0))
    out.append(("float64 solve, 1024 keys, replicated", lambda c: solve_program(f, c.hidden_size, 1024), 0))
    return out


def factor_program(f: int):
    """pm's Cholesky factor of one (F, F) C0, in float64 (on one device: XLA does not partition it)."""
    import jax
    import jax.numpy as jnp

    from jaxedit.editing import pm

    with jax.enable_x64(True):
        return pm._factor.lower(jax.ShapeDtypeStruct((f, f), jnp.float32), 1e-6, 0.0, cond_iters=32)


def solve_program(f: int, d: int, n: int):
    """pm_delta's float64 solve for n keys with a factored C0 (F, F)."""
    import jax
    import jax.numpy as jnp

    from jaxedit.editing import pm

    sds = jax.ShapeDtypeStruct
    with jax.enable_x64(True):
        factor = pm.Preservation(chol=sds((f, f), jnp.float64), cond=sds((), jnp.float32),
                                 positive_definite=sds((), jnp.bool_), factored=sds((), jnp.bool_),
                                 jitter=sds((), jnp.float32), shift=sds((), jnp.float32))
        return pm._pm_solve.lower(factor, sds((f, n), jnp.float32), sds((d, n), jnp.float32), 0.0, None,
                                  pm.DEFAULT_MAX_COND, None)


def main():
    import jax

    from jaxedit import hparams
    from llama3_flax import config, sharding

    plans = [("Llama-3-8B", config.llama3_8b(), sharding.make_mesh(1, 1)),
             ("Llama-3-70B", config.llama3_70b(), sharding.make_mesh(2, 4))]
    hp = hparams.preset("llama3-8b", "memit")
    rows = []
    for name, cfg, mesh in plans:
        for program, build, unread in programs(cfg, mesh, hp):
            r = compile_program(program, build, cfg, mesh, unread)
            rows.append({"model": name, **r})
            print(f"{name} {r['mesh']} {program}: {r['device_bytes'] / GB:.1f} GB per device "
                  f"(compiled in {r['compile_s']:.0f}s)", flush=True)
    load = os.getloadavg()
    print(f"\nBytes per device from compiled memory analysis ({jax.default_backend()} backend, bfloat16 weights; "
          f"temporaries from the float32-weight compile), load {load[0]:.2f}\n")
    print("| model | mesh | program | weights + inputs GB | temporaries GB | outputs GB | per device GB | "
          + " | ".join(f"fits {d}" for d in DEVICES) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(DEVICES))
    for r in rows:
        fits = " | ".join("yes" if r["device_bytes"] <= cap else "**no**" for cap in DEVICES.values())
        print(f"| {r['model']} | {r['mesh']} | {r['program']} | {r['args'] / GB:.1f} | {r['accelerator_temp'] / GB:.1f} "
              f"| {r['out'] / GB:.2f} | {r['device_bytes'] / GB:.1f} | {fits} |")


if __name__ == "__main__":
    main()
