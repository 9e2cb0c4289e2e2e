"""Packed rows: token trees under key_ends masks, and runs over a read-only prefix cache, each against
the plain one-sequence-per-row forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax import math as lm

TOL = 2e-5


@pytest.fixture(scope="module")
def setup():
    cfg = config.tiny(num_hidden_layers=3)
    return cfg, model.init_params(cfg, jax.random.PRNGKey(7), std=0.1)


def _hidden(cfg, params, seq):
    tokens = jnp.asarray([seq], jnp.int32)
    h, _ = model.run_layers(params, cfg, model.embed(params, tokens), jnp.ones_like(tokens))
    return np.asarray(h[0])


def test_attention_bias_key_ends_is_the_ancestor_relation():
    # tree a -> b -> {c, d -> e}, depth-first: a0 b1 c2 d3 e4; subtree ends 5 5 3 5 5; slot 5 padding
    slots = jnp.arange(6)[None]
    ends = jnp.asarray([[5, 5, 3, 5, 5, 0]])
    seen = np.asarray(lm.attention_bias(slots, slots, ends > 0, ends)[0, 0] == 0)
    want = np.zeros((6, 6), bool)
    for q, ancestors in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 3], 4: [0, 1, 3, 4], 5: []}.items():
        want[q, ancestors] = True
    np.testing.assert_array_equal(seen, want)


def test_packed_tree_row_equals_separate_sequences(setup):
    cfg, params = setup
    rng = np.random.default_rng(0)
    a, b, c, d = (list(rng.integers(1, cfg.vocab_size, n)) for n in (4, 3, 2, 5))
    # one row: sequence x = a + b, sequence y = a + c (sharing a), and sequence z = d, after them
    tokens = a + b + c + d + [0, 0]
    depths = list(range(7)) + [4, 5] + list(range(5)) + [0, 0]
    ends = [9] * 4 + [7] * 3 + [9] * 2 + [14] * 5 + [0, 0]
    h, _ = model.run_layers(params, cfg, model.embed(params, jnp.asarray([tokens])), jnp.asarray([[int(e > 0) for e in ends]]),
                            positions=jnp.asarray([depths]), key_ends=jnp.asarray([ends]))
    h = np.asarray(h[0])
    np.testing.assert_allclose(h[:7], _hidden(cfg, params, a + b), atol=TOL)
    np.testing.assert_allclose(h[[0, 1, 2, 3, 7, 8]], _hidden(cfg, params, a + c), atol=TOL)
    np.testing.assert_allclose(h[9:14], _hidden(cfg, params, d), atol=TOL)
    assert np.abs(h[7] - _hidden(cfg, params, a + b)[4]).max() > 1e-3  # c really differs from b


@pytest.mark.parametrize("first_layer", [0, 2])
def test_run_layers_over_prefix_equals_full_forward(setup, first_layer):
    cfg, params = setup
    rng = np.random.default_rng(1)
    seq = list(rng.integers(1, cfg.vocab_size, 9))
    n_prefix = 5
    tokens = jnp.asarray([seq], jnp.int32)
    h_in, _ = model.run_layers(params, cfg, model.embed(params, tokens), jnp.ones_like(tokens),
                               last_layer=first_layer - 1)
    # the prefix's keys/values from a cached run over its slots; the cache has spare unused slots
    slots = jnp.arange(n_prefix)[None]
    key_mask = jnp.asarray([[1] * n_prefix + [0] * 3])
    _, cache = model.run_layers_cached(params, cfg, h_in[:, :n_prefix], slots, slots, key_mask,
                                       model.empty_kv_cache(cfg, 1, n_prefix + 3), first_layer=first_layer)
    rest = jnp.arange(n_prefix, 9)[None]
    own = jnp.arange(4)[None]
    bias = lm.attention_bias(own, own, jnp.ones_like(own))
    prefix_bias = lm.attention_bias(own, jnp.zeros_like(key_mask), key_mask)
    h = model.run_layers_over_prefix(params, cfg, h_in[:, n_prefix:], rest, bias, cache, prefix_bias,
                                     first_layer=first_layer)
    np.testing.assert_allclose(np.asarray(h[0]), _hidden(cfg, params, seq)[n_prefix:], atol=TOL)

    # differentiable in the tokens' inputs, the prefix staying constant
    def loss(x, window=None):
        return jnp.sum(model.run_layers_over_prefix(params, cfg, x, rest, bias, cache, prefix_bias,
                                                    first_layer=first_layer, window=window) ** 2)
    grad = jax.grad(loss)(h_in[:, n_prefix:])
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0

    # the conditional-free window (every window that covers first_layer, the layers sliced or not)
    # gives the same outputs and gradients
    for window in range(cfg.num_hidden_layers - first_layer, cfg.num_hidden_layers + 1):
        h_w = model.run_layers_over_prefix(params, cfg, h_in[:, n_prefix:], rest, bias, cache, prefix_bias,
                                           first_layer=first_layer, window=window)
        np.testing.assert_allclose(np.asarray(h_w), np.asarray(h), atol=1e-6)
        np.testing.assert_allclose(np.asarray(jax.grad(loss)(h_in[:, n_prefix:], window)), np.asarray(grad),
                                   rtol=1e-5, atol=1e-6)
    sliced = {**params, "layers": model.window_layers(cfg, 2, params["layers"])}
    if first_layer >= cfg.num_hidden_layers - 2:
        h_s = model.run_layers_over_prefix(sliced, cfg, h_in[:, n_prefix:], rest, bias,
                                           model.window_layers(cfg, 2, tuple(cache)), prefix_bias,
                                           first_layer=first_layer, window=2)
        np.testing.assert_allclose(np.asarray(h_s), np.asarray(h), atol=1e-6)


def test_layer_window(setup):
    cfg, _ = setup
    L = cfg.num_hidden_layers
    assert [model.layer_window(cfg, f, step=2) for f in range(L + 1)] == [min(L, max(2, -(-(L - f) // 2) * 2))
                                                                          for f in range(L + 1)]
    assert model.layer_window(cfg, 0) == L and model.layer_window(cfg, L - 1, step=1) == 1
    with pytest.raises(ValueError, match="first_layer=-1"):
        model.layer_window(cfg, -1)
    with pytest.raises(ValueError, match="window=0"):
        model.scan_layers({"layers": {}}, cfg, None, None, None, window=0)
