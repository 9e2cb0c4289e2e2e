"""model_fingerprint changes when any single bit of any weight changes, and only then."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.cache import model_fingerprint
from llama3_flax import config, model


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=2, vocab_size=128)
    return cfg, jax.device_get(model.init_params(cfg, jax.random.PRNGKey(0), std=0.1))


def _with_element(params, leaf_index, flat_index, change):
    """A copy of params whose leaf number leaf_index has one element replaced by change(old)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.array(x) for x in leaves]
    target = leaves[leaf_index].reshape(-1)  # a view: writes go to leaves[leaf_index]
    target[flat_index] = change(target[flat_index])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_a_copy_has_the_same_fingerprint(tiny):
    cfg, params = tiny
    copy = jax.tree_util.tree_map(lambda x: jnp.array(np.array(x)), params)
    assert model_fingerprint(copy, cfg) == model_fingerprint(params, cfg)
    assert len(model_fingerprint(params, cfg)) == 20


def test_any_single_element_change_changes_the_fingerprint(tiny):
    # bit-level identity: a one-ulp step and 0.0 -> -0.0 (equal as numbers) both count as changes
    cfg, params = tiny
    base = model_fingerprint(params, cfg)
    rng = np.random.default_rng(0)
    leaves = jax.tree_util.tree_leaves(params)
    changes = {"one ulp up": lambda v: np.nextafter(v, np.float32(np.inf)),
               "one ulp down": lambda v: np.nextafter(v, np.float32(-np.inf)),
               "negated": lambda v: -v}
    seen, n_changed = {base}, 0
    for leaf_index, leaf in enumerate(leaves):
        for flat_index in {0, leaf.size - 1, *rng.integers(0, leaf.size, 6).tolist()}:
            for name, change in changes.items():
                fp = model_fingerprint(_with_element(params, leaf_index, flat_index, change), cfg)
                assert fp != base, f"{name} at element {flat_index} of leaf {leaf_index} kept the fingerprint"
                seen.add(fp)
                n_changed += 1
    zero = _with_element(params, 0, 5, lambda v: np.float32(0.0))
    negative_zero = _with_element(params, 0, 5, lambda v: np.float32(-0.0))
    assert model_fingerprint(zero, cfg) != model_fingerprint(negative_zero, cfg)
    # and the changed models are told apart from each other, not only from the original
    assert len(seen) == 1 + n_changed


def test_a_few_changed_embedding_rows_change_the_fingerprint():
    # 1,263 of 49,152 rows nudged: the case a strided sample of each array missed
    cfg = config.tiny(num_hidden_layers=2, vocab_size=49152)
    params = jax.device_get(model.init_params(cfg, jax.random.PRNGKey(3), std=0.05))
    rows = np.random.default_rng(1).choice(49152, 1263, replace=False)
    rows = rows[rows % 16 != 0]  # also off any stride-16 grid
    embed = np.array(params["embed_tokens"])
    embed[rows] *= np.float32(1.001)
    nudged = {**params, "embed_tokens": embed}
    assert model_fingerprint(nudged, cfg) != model_fingerprint(params, cfg)


def test_bfloat16_params_and_the_config_count(tiny):
    cfg, params = tiny
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    fp = model_fingerprint(bf16, cfg)
    assert fp != model_fingerprint(params, cfg)  # the dtype is part of the identity
    assert model_fingerprint(jax.tree_util.tree_map(jnp.array, bf16), cfg) == fp
    leaves, treedef = jax.tree_util.tree_flatten(bf16)
    first = leaves[0].at[3, 7].set(jnp.nextafter(leaves[0][3, 7], jnp.bfloat16(1e9)))
    assert model_fingerprint(jax.tree_util.tree_unflatten(treedef, [first, *leaves[1:]]), cfg) != fp
    other_cfg = dataclasses.replace(cfg, rms_norm_eps=cfg.rms_norm_eps / 10)
    assert model_fingerprint(params, other_cfg) != model_fingerprint(params, cfg)


def test_remembered_fingerprints_never_go_stale():
    """Fingerprints of jax.Array trees are remembered by leaf identity; numpy leaves, which can change
    in place, are hashed every time."""
    from jaxedit import testing

    cfg, params, _ = testing.tiny_model(seed=5)
    first = model_fingerprint(params, cfg)
    assert model_fingerprint(params, cfg) == first
    changed = {**params, "norm": params["norm"].at[0].add(1.0)}
    assert model_fingerprint(changed, cfg) != first
    mutable = jax.tree_util.tree_map(np.array, params)
    assert model_fingerprint(mutable, cfg) == first
    mutable["norm"][0] += 1.0  # in place
    assert model_fingerprint(mutable, cfg) == model_fingerprint(changed, cfg) != first
