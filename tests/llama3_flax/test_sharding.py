"""Parameters on a device mesh: the rules, their refusals, sliced HF loading, and every editing stage
on meshes of 8 forced host devices giving the one-device results (in a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxedit import testing
from llama3_flax import checkpoint, sharding

ROOT = Path(__file__).resolve().parents[2]
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # small programs: compiling dominates, so compile less


def _in_eight_devices(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **EIGHT}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _mesh_report(which: str, tmp_path) -> dict:
    out = tmp_path / f"{which}.json"
    env = {**os.environ, **EIGHT}
    run = subprocess.run([sys.executable, "-m", "tests.llama3_flax.mesh_worker", which, str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_the_two_mesh_reports_cover_every_mesh():
    from tests.llama3_flax import mesh_worker

    both = set(mesh_worker.TINY_MESHES) | set(mesh_worker.SMOLLM2_MESHES)
    assert both == {(d, 8 // d) for d in (1, 2, 4, 8)}


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_every_stage_on_every_mesh_equals_one_device(which, tmp_path):
    report = _mesh_report(which, tmp_path)
    assert report["delta_norm"] > 0
    assert len(report["meshes"]) == 2, report["meshes"].keys()
    layers, d, f = report["global_shape"]
    for mesh, r in report["meshes"].items():
        data, model = map(int, mesh.split("x"))
        # down_proj (L, D, F): D over data, F over model, on all 8 devices
        assert r["down_proj_spec"] == ["None", "data", "model"], (mesh, r)
        assert r["down_proj_shard_shapes"] == [[layers, d // data, f // model]], (mesh, r)
        assert r["down_proj_devices"] == 8
        assert r["embed_spec"] == ["model", "data"]
        for stage in ("keys", "c0", "values", "delta", "nll"):
            assert r[stage] <= 1e-5, (mesh, stage, r[stage])
        assert r["same_decisions"], mesh
    if which == "tiny":
        # bfloat16 weights on a 2x4 mesh against bfloat16 on one device: C0 accumulates in float32,
        # the solve runs in float64 and the update is written in bfloat16; activations are rounded
        # to bfloat16 at each matmul, so the order of float32 sums shows at bfloat16's 3 digits
        half = report["bfloat16"]
        assert half["c0_dtype"] == "float32" and half["down_proj_dtype"] == "bfloat16"
        for stage in ("keys", "c0", "values", "delta", "nll"):
            assert half[stage] <= 1e-2, (stage, half)
        assert half["same_decisions"]


def test_rules_that_do_not_fit_are_refused():
    cfg, params, _ = testing.tiny_model()
    mesh = sharding.make_mesh(1, 1)
    bad_axis = sharding.ShardingRules(tuple((n, tuple("fsdp" if e == sharding.DATA else e for e in spec))
                                           for n, spec in sharding.LLAMA_RULES.table))
    with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
        sharding.shard_params(params, cfg, mesh, bad_axis)
    short = sharding.ShardingRules(tuple(x for x in sharding.LLAMA_RULES.table if x[0] != "layers/up_proj"))
    with pytest.raises(ValueError, match="no sharding rule for parameter 'layers/up_proj'"):
        sharding.shard_params(params, cfg, mesh, short)
    others = tuple(x for x in sharding.LLAMA_RULES.table if x[0] != "layers/down_proj")
    wrong_rank = sharding.ShardingRules(others + (("layers/down_proj", (None, "data")),))
    with pytest.raises(ValueError, match="has 2 entries"):
        sharding.shard_params(params, cfg, mesh, wrong_rank)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(2, 3, devices=jax.devices()[:1] * 5)  # 5, whatever this process has


def test_dims_that_do_not_divide_and_sliced_loading(tmp_path):
    """In 8 devices: a 3-wide model axis over d_ff 96 fits, a 5-wide one is refused naming the dim; a
    sharded HF folder loads onto a 2x4 mesh equal to loading it whole, reading only slices."""
    cfg, params, _ = testing.tiny_model()
    folder = checkpoint.save_hf_folder(tmp_path / "hf", params, cfg, max_shard_bytes=200_000)
    assert len(list(folder.glob("*.safetensors"))) > 2
    code = f"""
import numpy as np, jax
from llama3_flax import checkpoint, sharding
from jaxedit import testing
cfg, params, _ = testing.tiny_model()
try:
    sharding.make_mesh(1, 5, devices=jax.devices()[:5])
    sharding.shard_params(params, cfg, sharding.make_mesh(1, 5, devices=jax.devices()[:5]))
    raise SystemExit("a 5-wide model axis over d_ff 96 was accepted")
except ValueError as e:
    assert "does not divide over mesh axis 'model' of size 5" in str(e), e
    print("REFUSED", e)
mesh = sharding.make_mesh(2, 4)
cfg2, whole = checkpoint.load_hf_folder({str(folder)!r})
cfg3, onto, reads = checkpoint.load_hf_folder_onto_mesh({str(folder)!r}, mesh)
assert cfg2 == cfg3
for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(whole)[0], jax.tree_util.tree_leaves(onto)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
    assert len(b.sharding.device_set) == 8
down = onto["layers"]["down_proj"]
assert {{tuple(s.data.shape) for s in down.addressable_shards}} == {{(cfg.num_hidden_layers, cfg.hidden_size // 2, cfg.intermediate_size // 4)}}
sliced = [shape for name, shape in reads.reads if name.endswith("mlp.down_proj.weight")]
assert sliced and all(shape == (cfg.hidden_size // 2, cfg.intermediate_size // 4) for shape in sliced), sliced
full = {{n: a.shape for n, a in checkpoint.hf_state_dict_from_params(whole, cfg).items()}}
for name, shape in reads.reads:  # every matrix read is an eighth of it; norms are replicated
    assert int(np.prod(shape)) * (1 if "norm" in name else 8) == int(np.prod(full[name])), (name, shape)
print("READ", reads.read_bytes, "OF", reads.checkpoint_bytes)
"""
    run = _in_eight_devices(code)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "REFUSED" in run.stdout and "READ" in run.stdout
