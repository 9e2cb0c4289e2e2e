"""Llama parameters on a named device mesh: which axis of each weight goes over which mesh axis.

A mesh has two named axes: DATA (batch rows, and the weights' input-width dim as fully sharded data
parallelism) and MODEL (tensor parallelism: attention heads and d_ff). The rules are a small table
from parameter path to a PartitionSpec; every function of llama3_flax and jaxedit takes the sharded
tree as it takes a one-device tree, and XLA partitions the programs (GSPMD). Nothing here changes a
number: a sharded run computes what the one-device run computes, up to the order of float sums.

  mesh = make_mesh(data=2, model=4)
  params = shard_params(params, cfg, mesh)        # or checkpoint.load_hf_folder_onto_mesh(...)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama3_flax.config import LlamaConfig
from llama3_flax.model import Params, param_shapes

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Parameter path ("embed_tokens", "layers/q_proj", ...) -> PartitionSpec entries (mesh axis name
    or None per array dim). Every parameter needs a rule."""

    table: tuple[tuple[str, tuple], ...]

    def spec(self, path: str) -> tuple:
        for name, spec in self.table:
            if name == path:
                return tuple(spec)
        raise ValueError(f"no sharding rule for parameter {path!r} (rules cover {[n for n, _ in self.table]})")

    def axis_names(self) -> set[str]:
        return {a for _, spec in self.table for entry in spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))}


# Weights are (out, in) per layer, stacked over layers (never sharded: the layer scan walks it).
# Column-parallel q/k/v/gate/up split their output (heads, d_ff) over MODEL; row-parallel o/down
# split their input the same way, so each MLP and attention block needs one reduction over MODEL.
# The other dim goes over DATA (FSDP): gathered when a layer runs, never held whole by one device.
LLAMA_RULES = ShardingRules((
    ("embed_tokens", (MODEL, DATA)),
    ("lm_head", (MODEL, DATA)),
    ("norm", (None,)),
    ("layers/input_layernorm", (None, None)),
    ("layers/post_attention_layernorm", (None, None)),
    ("layers/q_proj", (None, MODEL, DATA)),
    ("layers/k_proj", (None, MODEL, DATA)),
    ("layers/v_proj", (None, MODEL, DATA)),
    ("layers/o_proj", (None, DATA, MODEL)),
    ("layers/gate_proj", (None, MODEL, DATA)),
    ("layers/up_proj", (None, MODEL, DATA)),
    ("layers/down_proj", (None, DATA, MODEL)),
    # Qwen2's q/k/v biases follow their projections' output (heads) over MODEL
    ("layers/q_bias", (None, MODEL)),
    ("layers/k_bias", (None, MODEL)),
    ("layers/v_bias", (None, MODEL)),
))


def make_mesh(data: int, model: int, devices: Sequence | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (default: jax.devices(), every
    process's devices under jax.distributed)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
    if data * model > len(devices):
        raise ValueError(f"a {data}x{model} mesh needs {data * model} devices; there are {len(devices)}")
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def checked_spec(path: str, shape: tuple, spec: tuple, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one array, or ValueError naming the parameter, dim and mesh axis that do
    not fit (unknown axis, wrong rank, a dim the axis does not divide)."""
    if len(spec) != len(shape):
        raise ValueError(f"sharding rule for {path!r} has {len(spec)} entries; the array has shape {shape}")
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        for name in (entry if isinstance(entry, tuple) else (entry,)):
            if name not in mesh.shape:
                raise ValueError(f"sharding rule for {path!r} names mesh axis {name!r}; the mesh has axes "
                                 f"{tuple(mesh.axis_names)}")
        size = _axis_size(mesh, entry)
        if shape[dim] % size:
            raise ValueError(f"{path}: dim {dim} of size {shape[dim]} does not divide over mesh axis {entry!r} "
                             f"of size {size} (shape {shape}, mesh {dict(mesh.shape)})")
    return PartitionSpec(*spec)


def _paths(tree) -> list[tuple[str, object]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: ShardingRules = LLAMA_RULES) -> Params:
    """The NamedSharding of every parameter of cfg's model (a tree like the params), checked."""
    shapes = param_shapes(cfg)
    leaves = [NamedSharding(mesh, checked_spec(path, shape, rules.spec(path), mesh)) for path, shape in _paths(shapes)]
    treedef = jax.tree_util.tree_structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def shard_params(params: Params, cfg: LlamaConfig, mesh: Mesh, rules: ShardingRules = LLAMA_RULES) -> Params:
    """params placed on the mesh by the rules (a new tree; the input is untouched).

    Raises ValueError before anything moves: params not of cfg's shapes (another model's params, or
    the wrong config, would otherwise be laid out by cfg's rules without a word), or rules that do not fit.
    """
    from llama3_flax.checkpoint import check_params_match_config

    check_params_match_config(params, cfg)
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def mesh_of(tree) -> Mesh | None:
    """The mesh the tree's arrays are laid out on (None for one-device arrays)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def rows_over_data(mesh: Mesh | None, tree):
    """Arrays of `tree` placed with their leading (row) axis over DATA where it divides, replicated
    otherwise (and left as they are without a mesh): batches follow the params' mesh."""
    if mesh is None:
        return tree
    n = mesh.shape[DATA]

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = PartitionSpec(DATA) if (x.ndim and x.shape[0] % n == 0) else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, np.ndarray):  # every process holds the same batch: each device takes its slice
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(place, tree)
