"""Causal attention in query blocks equals the full-matrix attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model


@pytest.mark.parametrize("block", [4, 5, 16, 64])
def test_decoder_layer_with_query_blocks_matches_full_attention(block):
    cfg = config.tiny(num_hidden_layers=2)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    lp = jax.tree.map(lambda x: x[1], params["layers"])
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 18, cfg.hidden_size)), jnp.float32)
    mask = np.ones((3, 18), np.int32)
    mask[1, 11:] = 0  # right padding
    mask[2, :] = 0  # a row of only padding
    # row 0 packs two samples (slots 0-6 and 7-17), each seeing only itself, positions from 0
    positions = np.broadcast_to(np.arange(18), (3, 18)).copy()
    positions[0, 7:] -= 7
    key_ends = np.full((3, 18), 18, np.int32)
    key_ends[0, :7] = 7
    cos, sin, bias = model.layer_context(cfg, jnp.asarray(mask), jnp.asarray(positions), jnp.asarray(key_ends))
    full = model.decoder_layer(cfg, lp, h, cos, sin, bias)
    blocked = model.decoder_layer(cfg, lp, h, cos, sin, bias, query_block=block)
    real = mask.astype(bool)  # a query that sees no key at all (a row of padding) averages any keys
    for a, b in zip(full, blocked):
        np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], rtol=1e-5, atol=1e-5)
