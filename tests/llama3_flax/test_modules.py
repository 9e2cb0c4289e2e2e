"""The Flax NNX wrapper llama3_flax.modules.LlamaForCausalLM against the pure functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama3_flax
from llama3_flax import config, model
from llama3_flax.modules import LlamaForCausalLM

from .reference import padded_batch, rel_err, torch_logits, torch_model


def _same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tiny(request):
    cfg = config.tiny(tie_word_embeddings=request.param)
    params = model.init_params(cfg, jax.random.PRNGKey(2), std=0.1)
    tokens, mask = padded_batch(np.random.default_rng(0), [12, 7], cfg.vocab_size, "right")
    return cfg, params, jnp.asarray(tokens), jnp.asarray(mask)


def test_exported_from_package():
    assert llama3_flax.LlamaForCausalLM is LlamaForCausalLM
    assert issubclass(LlamaForCausalLM, nnx.Module)


def test_params_round_trip_exactly(tiny):
    cfg, params, _, _ = tiny
    m = LlamaForCausalLM.from_params(cfg, params)
    _same_tree(m.params(), params)
    # held as nnx.Param variables with the names and stacked shapes of model.py
    state = nnx.state(m, nnx.Param)
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), nnx.to_pure_dict(state))
    assert shapes == model.param_shapes(cfg)
    assert isinstance(m.layers["q_proj"], nnx.Param)
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == model.num_params(params)


def test_call_equals_pure_forward(tiny):
    cfg, params, tokens, mask = tiny
    m = LlamaForCausalLM.from_params(cfg, params)
    want = model.forward(params, cfg, tokens, mask)
    np.testing.assert_array_equal(np.asarray(m(tokens, mask)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(m(tokens)), np.asarray(model.forward(params, cfg, tokens)))
    # under nnx.jit too, and after nnx.split / nnx.merge
    jitted = nnx.jit(lambda mod, t, k: mod(t, k))
    assert rel_err(jitted(m, tokens, mask), want) <= 1e-6
    graphdef, state = nnx.split(m)
    assert rel_err(nnx.merge(graphdef, state)(tokens, mask), want) <= 1e-6


def test_capture_passes_through(tiny):
    cfg, params, tokens, mask = tiny
    m = LlamaForCausalLM.from_params(cfg, params)
    cap = model.Capture(layers=jnp.array([1]), positions=jnp.array([[3], [5]]))
    _, got = m(tokens, mask, capture=cap)
    _, want = model.forward(params, cfg, tokens, mask, capture=cap)
    np.testing.assert_array_equal(np.asarray(got.mlp_in), np.asarray(want.mlp_in))


def test_random_init_matches_transformers(tiny):
    cfg, _, tokens, mask = tiny
    m = LlamaForCausalLM(cfg, nnx.Rngs(params=7))
    again = LlamaForCausalLM(cfg, nnx.Rngs(params=7))
    _same_tree(m.params(), again.params())  # seeded
    assert not np.array_equal(np.asarray(m.embed_tokens[...]),
                              np.asarray(LlamaForCausalLM(cfg, nnx.Rngs(params=8)).embed_tokens[...]))
    ref = torch_model(cfg, m.params())
    assert rel_err(m(tokens, mask), torch_logits(ref, np.asarray(tokens), np.asarray(mask)), np.asarray(mask)) <= 1e-5


def test_gradients_equal_pure_gradients(tiny):
    cfg, params, tokens, mask = tiny

    def loss_pure(p):
        return jnp.mean(jax.nn.logsumexp(model.forward(p, cfg, tokens, mask), -1))

    m = LlamaForCausalLM.from_params(cfg, params)
    grads = nnx.grad(lambda mod: jnp.mean(jax.nn.logsumexp(mod(tokens, mask), -1)))(m)
    want = jax.grad(loss_pure)(params)
    got = nnx.to_pure_dict(grads)
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        g = got
        for key in path:
            g = g[key.key]
        assert rel_err(g, w) <= 1e-6, jax.tree_util.keystr(path)


def test_updating_a_variable_changes_the_forward(tiny):
    cfg, params, tokens, mask = tiny
    m = LlamaForCausalLM.from_params(cfg, params)
    before = m(tokens, mask)
    new_down = params["layers"]["down_proj"].at[1].add(0.05)
    m.layers["down_proj"][...] = new_down
    np.testing.assert_array_equal(np.asarray(m.params()["layers"]["down_proj"]), np.asarray(new_down))
    edited = dict(params, layers=dict(params["layers"], down_proj=new_down))
    np.testing.assert_array_equal(np.asarray(m(tokens, mask)), np.asarray(model.forward(edited, cfg, tokens, mask)))
    assert rel_err(m(tokens, mask), before) > 1e-4


def test_rejects_mismatched_params():
    cfg = config.tiny()
    params = model.init_params(config.tiny(tie_word_embeddings=True), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="params do not match the config"):
        LlamaForCausalLM.from_params(cfg, params)
    with pytest.raises(ValueError, match="needs rngs"):
        LlamaForCausalLM(cfg)
