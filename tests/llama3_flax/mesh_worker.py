"""Every editing stage on one device and on meshes of 8 forced host devices; prints the differences.

Run by test_sharding.py in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8 must be
set before JAX starts, and the rest of the suite keeps one device):

  python -m tests.llama3_flax.mesh_worker tiny|smollm2 OUT.json
"""
from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np

from experiments import world
from jaxedit.data import counterfact
from jaxedit.editing import editor, keys
from jaxedit.eval import metrics
from llama3_flax import sharding

# SmolLM2 checks its real widths on the meshes that split them most (a model axis of 8 over 9 heads'
# 576 columns, and data and model both split); the tiny model takes the other two, so that the two
# reports together cover every way of splitting 8 devices over data and model.
SMOLLM2_MESHES = ((4, 2), (1, 8))
TINY_MESHES = ((8, 1), (2, 4))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def stages(params, cfg, tok, cases, hp, groups, c0=None) -> dict:
    """keys, C0, values, the solve (dW) and scoring of one MEMIT edit, as host arrays.

    c0: the C0 the solve uses (default: the one computed here). Comparing each stage alone, the
    sharded solve gets the one-device C0: a C0 from a few thousand tokens is ill-conditioned, and its
    float noise would be amplified into dW whatever the sharding.
    """
    layer = hp.layers[0]
    out = {"keys": keys.keys_at_layers(params, cfg, tok, cases, groups, [layer])[0]}
    out["c0"] = world.covariances(params, cfg, tok, [layer], hp, None, progress=False)[layer]
    c0_dtype = str(out["c0"].dtype)
    values = editor.edit_values(params, cfg, tok, cases, hp, templates=groups)
    out["values"] = values.target
    solve_c0 = out["c0"] if c0 is None else c0
    new, _ = editor.edit(params, cfg, tok, cases, hp, covariances={layer: solve_c0}, templates=groups, values=values)
    out["delta"] = new["layers"]["down_proj"][layer] - params["layers"]["down_proj"][layer]
    res = metrics.evaluate(new, cfg, tok, cases, batch_size=4)
    out["nll"] = np.asarray([c.rewrite_nll + c.paraphrase_nll + c.neighborhood_nll for c in res.cases])
    out["decisions"] = [(c.es, c.ps, c.ns) for c in res.cases]
    out = {k: (v if k == "decisions" else np.asarray(jax.device_get(v), np.float64)) for k, v in out.items()}
    return {**out, "c0_dtype": c0_dtype}


def main(which: str, out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    if which == "tiny":
        cfg, params, tok = world.load_model("tiny-random")
        spec = "tiny-random"
        cases = tuple(counterfact.load_counterfact("edit", n=2, seed=0))
    else:  # SmolLM2's weights, widths and tokenizer; its first 6 of 30 layers (sharding acts per layer)
        cfg, params, tok = world.load_model("smollm2")
        cfg = dataclasses.replace(cfg, num_hidden_layers=6)
        params = {**params, "layers": {k: v[:6] for k, v in params["layers"].items()}}
        spec = "smollm2"
        cases = tuple(counterfact.load_counterfact("edit", n=2, seed=0))
    # C0 from enough tokens to be positive definite (more than d_ff = 1536 for SmolLM2), few steps
    samples = 16 if which == "tiny" else 64
    hp = world.hparams_for(spec, "memit", v_steps=3, cov_samples=samples, cov_max_length=64,  # SmolLM2's preset
                           cfg=None if which == "tiny" else dataclasses.replace(cfg, num_hidden_layers=30))
    groups = world.templates(params, cfg, tok, hp, None)
    ref = stages(params, cfg, tok, cases, hp, groups)
    report = {"meshes": {}}
    for data, model in (TINY_MESHES if which == "tiny" else SMOLLM2_MESHES):
        mesh = sharding.make_mesh(data, model)
        sharded = sharding.shard_params(params, cfg, mesh)
        w = sharded["layers"]["down_proj"]
        shard_shapes = sorted({tuple(s.data.shape) for s in w.addressable_shards})
        got = stages(sharded, cfg, tok, cases, hp, groups, c0=ref["c0"])
        report["meshes"][f"{data}x{model}"] = {
            "down_proj_spec": [str(x) for x in w.sharding.spec],
            "down_proj_shard_shapes": shard_shapes,
            "down_proj_devices": len(w.sharding.device_set),
            "embed_spec": [str(x) for x in sharded["embed_tokens"].sharding.spec],
            **{k: relative(got[k], ref[k]) for k in ("keys", "c0", "values", "delta", "nll")},
            "same_decisions": got["decisions"] == ref["decisions"],
        }
    if which == "tiny":  # bfloat16 weights end to end: float32 sums and C0, float64 solve, bf16 written
        import jax.numpy as jnp
        from llama3_flax import model as lmodel

        half = lmodel.matrices_as(params, jnp.bfloat16)
        ref16 = stages(half, cfg, tok, cases, hp, groups)
        sharded = sharding.shard_params(half, cfg, sharding.make_mesh(2, 4))
        got16 = stages(sharded, cfg, tok, cases, hp, groups, c0=ref16["c0"])
        new_dtype = str(editor.add_to_down_proj(sharded, hp.layers[0], got16["delta"]).get("layers")["down_proj"].dtype)
        report["bfloat16"] = {"c0_dtype": got16["c0_dtype"],
                              "down_proj_dtype": new_dtype,
                              **{k: relative(got16[k], ref16[k]) for k in ("keys", "c0", "values", "delta", "nll")},
                              "vs_float32": {k: relative(ref16[k], ref[k]) for k in ("keys", "values", "delta", "nll")},
                              "same_decisions": got16["decisions"] == ref16["decisions"]}
    report["global_shape"] = list(params["layers"]["down_proj"].shape)
    report["delta_norm"] = float(np.linalg.norm(ref["delta"]))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
