"""model.run_layers_restoring against a layer-by-layer loop written here; prefixes shared by rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax import math as lm

TOL = 1e-5
T = 7


@pytest.fixture(scope="module")
def setup():
    cfg = config.tiny(num_hidden_layers=4)
    params = model.init_params(cfg, jax.random.PRNGKey(5), std=0.1)
    h = jax.random.normal(jax.random.PRNGKey(1), (3, T, cfg.hidden_size))
    values = jax.random.normal(jax.random.PRNGKey(2), (cfg.num_hidden_layers, 5, cfg.hidden_size))
    return cfg, params, h, values


def _causal(b, t):
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    return slots, lm.attention_bias(slots, slots, jnp.ones((b, t), jnp.int32))


def _reference(cfg, params, h, restore):
    """Plain loop over layers and rows, putting each restored state back by hand."""
    h = np.asarray(h, np.float32).copy()
    b, t, _ = h.shape
    positions, bias = _causal(b, t)
    cos, sin = lm.rope_angles(cfg, positions)
    r = jax.tree_util.tree_map(np.asarray, restore)
    for i in range(cfg.num_hidden_layers):
        lp = jax.tree_util.tree_map(lambda w: w[i], params["layers"])
        h_mid = np.array(model.attention_block(cfg, lp, jnp.asarray(h), cos, sin, bias)[0])
        for row, p in np.ndindex(r.slots.shape):
            s, kind, value = r.slots[row, p], r.kind[row, p], r.values[i, r.source[row, p]]
            if s >= 0 and r.first[row, p] <= i <= r.last[row, p] and kind == model.RESTORE_ATTN:
                h_mid[row, s] = h[row, s] + value
        h_out = np.array(model.mlp_block(cfg, lp, jnp.asarray(h_mid))[0])
        for row, p in np.ndindex(r.slots.shape):
            s, kind, value = r.slots[row, p], r.kind[row, p], r.values[i, r.source[row, p]]
            if s >= 0 and r.first[row, p] <= i <= r.last[row, p]:
                if kind == model.RESTORE_MLP:
                    h_out[row, s] = h_mid[row, s] + value
                elif kind == model.RESTORE_RESID:
                    h_out[row, s] = value
        h = h_out
    return h


def _restoration(values, slots, kind, first, last, source):
    as_int = lambda x: jnp.asarray(x, jnp.int32)
    return model.Restoration(slots=as_int(slots), kind=as_int(kind), first=as_int(first), last=as_int(last),
                             source=as_int(source), values=values)


def test_each_kind_and_window_matches_a_loop_by_hand(setup):
    cfg, params, h, values = setup
    restore = _restoration(values, slots=[[2, 5], [0, -1], [6, 3]],
                           kind=[[model.RESTORE_ATTN, model.RESTORE_MLP], [model.RESTORE_RESID, 0],
                                 [model.RESTORE_MLP, model.RESTORE_RESID]],
                           first=[[0, 1], [2, 0], [1, 3]], last=[[3, 2], [2, 3], [1, 3]],
                           source=[[0, 1], [2, 0], [3, 4]])
    positions, bias = _causal(3, T)
    got = model.run_layers_restoring(params, cfg, h, positions, bias, restore)
    np.testing.assert_allclose(got, _reference(cfg, params, h, restore), atol=TOL, rtol=TOL)


def test_nothing_restored_is_the_plain_run(setup):
    cfg, params, h, values = setup
    restore = _restoration(values, slots=-np.ones((3, 1)), kind=np.zeros((3, 1)), first=np.zeros((3, 1)),
                           last=np.full((3, 1), 3), source=np.zeros((3, 1)))
    positions, bias = _causal(3, T)
    got = model.run_layers_restoring(params, cfg, h, positions, bias, restore)
    want, _ = model.run_layers(params, cfg, h, jnp.ones((3, T), jnp.int32))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_restoring_every_residual_output_gives_the_clean_run_exactly(setup):
    cfg, params, h, _ = setup
    l = cfg.num_hidden_layers
    clean = h[:1]
    capture = model.Capture(layers=jnp.arange(l), positions=jnp.arange(T)[None])
    want, captured = model.run_layers(params, cfg, clean, jnp.ones((1, T), jnp.int32), capture=capture)
    values = captured.resid_out[:, 0]  # (L, T, D): one entry per slot
    restore = _restoration(values, slots=np.arange(T)[None], kind=np.zeros((1, T)), first=np.zeros((1, T)),
                           last=np.full((1, T), l - 1), source=np.arange(T)[None])
    positions, bias = _causal(1, T)
    corrupted = h[2:] * 3.0
    got = model.run_layers_restoring(params, cfg, corrupted, positions, bias, restore)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rows_over_a_shared_prefix_equal_whole_rows(setup):
    """Rows that run only slots i.. over cached keys of slots < i, two rows per cached prefix."""
    cfg, params, h, values = setup
    full_positions, full_bias = _causal(2, T)
    _, caches = model.run_layers_cached(params, cfg, h[:2], full_positions, full_positions, jnp.ones((2, T), jnp.int32),
                                        model.empty_kv_cache(cfg, 2, T))
    start, rows = 3, np.array([0, 1, 1, 0])
    width = T - start
    suffix = h[:2][rows, start:]
    positions = jnp.broadcast_to(jnp.arange(start, T), (4, width))
    local = jnp.broadcast_to(jnp.arange(width), (4, width))
    bias = lm.attention_bias(local, local, jnp.ones((4, width), jnp.int32))
    prefix_bias = lm.attention_bias(jnp.full((4, width), start - 1), jnp.broadcast_to(jnp.arange(T), (4, T)),
                                    jnp.ones((4, T), jnp.int32))
    kinds = [model.RESTORE_RESID, model.RESTORE_MLP, model.RESTORE_ATTN, model.RESTORE_MLP]
    restore = _restoration(values, slots=[[0], [1], [0], [2]], kind=np.array(kinds)[:, None], first=[[1], [0], [0], [2]],
                           last=[[1], [3], [2], [3]], source=[[0], [1], [2], [3]])
    shared = model.run_layers_restoring(params, cfg, suffix, positions, bias, restore, caches, prefix_bias,
                                        prefix_rows=jnp.asarray(rows))
    copied = model.run_layers_restoring(params, cfg, suffix, positions, bias, restore,
                                        tuple(c[:, rows] for c in caches), prefix_bias)
    np.testing.assert_allclose(shared, copied, atol=1e-6, rtol=1e-6)
    whole = restore.replace(slots=restore.slots + start)
    want = _reference(cfg, params, h[:2][rows], whole)[:, start:]
    np.testing.assert_allclose(shared, want, atol=TOL, rtol=TOL)


def test_starting_at_a_later_layer_from_its_input(setup):
    """Layers before every restoration window may be skipped: start there from the residual entering it."""
    cfg, params, h, values = setup
    restore = _restoration(values, slots=[[4]] * 3, kind=[[model.RESTORE_MLP]] * 3, first=[[2]] * 3,
                           last=[[3]] * 3, source=[[1]] * 3)
    positions, bias = _causal(3, T)
    entering, _ = model.run_layers(params, cfg, h, jnp.ones((3, T), jnp.int32), last_layer=1)
    got = model.run_layers_restoring(params, cfg, entering, positions, bias, restore, first_layer=2)
    want = model.run_layers_restoring(params, cfg, h, positions, bias, restore)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
