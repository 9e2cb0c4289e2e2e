"""Logits parity with transformers' PyTorch LlamaForCausalLM on tiny random configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax import math as lm

from .reference import padded_batch, random_tokens, rel_err, torch_logits, torch_model

TOL = 1e-5

CONFIGS = {
    "multi_head": dict(num_attention_heads=4, num_key_value_heads=4),
    "grouped": dict(num_attention_heads=4, num_key_value_heads=2),
    "multi_query": dict(num_attention_heads=4, num_key_value_heads=1),
    "grouped_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "multi_query_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    # head_dim 16, theta 5e5: wavelengths 6.3, 32.5, 168, ... With original length 64 the second
    # frequency falls in the smoothed band (16 <= 32.5 <= 64), the others are divided by the factor.
    "rope_scaled_64": dict(num_attention_heads=4, num_key_value_heads=2,
                           rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 64)),
    "rope_scaled_16_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 16)),
}


def _setup(name, seed=0):
    cfg = config.tiny(**CONFIGS[name])
    params = model.init_params(cfg, jax.random.PRNGKey(seed))
    return cfg, params, torch_model(cfg, params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_unpadded(name):
    cfg, params, ref = _setup(name)
    tokens = random_tokens(np.random.default_rng(1), 2, 48, cfg.vocab_size)
    got = model.forward(params, cfg, jnp.asarray(tokens))
    want = torch_logits(ref, tokens)
    assert got.shape == want.shape == (2, 48, cfg.vocab_size)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["grouped", "multi_query_tied", "rope_scaled_64"])
def test_logits_match_transformers_padded(name, side):
    cfg, params, ref = _setup(name)
    tokens, mask = padded_batch(np.random.default_rng(2), [48, 30, 5], cfg.vocab_size, side)
    got = np.asarray(model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    want = torch_logits(ref, tokens, mask)
    real = mask.astype(bool)
    assert np.isfinite(got[real]).all()
    assert rel_err(got, want, real) <= TOL
    # Each row is also what the unpadded sequence alone gives (padding is invisible).
    for b in range(len(tokens)):
        alone = model.forward(params, cfg, jnp.asarray(tokens[b][real[b]][None]))
        assert rel_err(got[b][real[b]], alone[0]) <= TOL


def test_rope_scaling_changes_long_sequences():
    """The rope-scaled cases above are not vacuous: scaling changes the logits of a 48-token sequence."""
    cfg = config.tiny(rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 64))
    params = model.init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    tokens = jnp.asarray(random_tokens(np.random.default_rng(1), 1, 48, cfg.vocab_size))
    scaled = model.forward(params, cfg, tokens)
    plain = model.forward(params, cfg.replace(rope_scaling=None), tokens)
    assert rel_err(scaled, plain) > 1e-3


@pytest.mark.parametrize("scaling", [None, config.RopeScaling(8.0, 1.0, 4.0, 64),
                                     config.RopeScaling(8.0, 1.0, 4.0, 16),
                                     config.RopeScaling(32.0, 1.0, 4.0, 8192)])
def test_rope_inverse_frequencies_match_transformers(scaling):
    import torch  # noqa: F401
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config.tiny(rope_scaling=scaling).replace(head_dim=64, rope_theta=500000.0)
    hf = HFConfig(**cfg.to_hf())
    if scaling is None:
        want = 1.0 / (cfg.rope_theta ** (np.arange(0, 64, 2) / 64))
    else:
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        want = want.numpy()
    got = np.asarray(lm.rope_inverse_frequencies(cfg))
    assert got.shape == (32,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if scaling is not None and scaling.original_max_position_embeddings >= 64:
        # the three regimes (kept, smoothed, divided by the factor) are all present at head_dim 64
        plain = 1.0 / (cfg.rope_theta ** (np.arange(0, 64, 2) / 64))
        ratio = got / plain
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / scaling.factor).any()
        assert ((ratio < 0.999) & (ratio > 1.001 / scaling.factor)).any()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_bfloat16_forward_is_as_accurate_as_transformers_bfloat16(kv_heads):
    """bfloat16 weights and activations: close to transformers in bfloat16, and no farther from the
    float32 result than transformers' own bfloat16 forward is."""
    import torch

    cfg = config.tiny(num_key_value_heads=kv_heads, dtype="bfloat16")
    params = model.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
    ref = torch_model(cfg, params).to(torch.bfloat16)
    tokens, mask = padded_batch(np.random.default_rng(0), [40, 20], cfg.vocab_size, "left")
    got = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    want = torch_logits(ref, tokens, mask)
    params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)  # same (exact) weights
    exact = model.forward(params32, cfg.replace(dtype="float32"), jnp.asarray(tokens), jnp.asarray(mask))
    assert rel_err(got, want, mask) <= 3e-2
    assert rel_err(got, exact, mask) <= 1.5 * rel_err(want, exact, mask)


def test_linear_multiplies_at_the_weight_dtype_and_sums_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    got = lm.linear(x, w)
    assert got.dtype == jnp.float32
    rounded = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(got), rounded, rtol=1e-5, atol=1e-5)
    both = lm.linear(x.astype(jnp.bfloat16), w)  # bfloat16 in, float32 sums, rounded once at the end
    assert both.dtype == jnp.bfloat16
    # rounded once to bfloat16: within half a bfloat16 step (2^-8 relative) of the exact product; a
    # float32 sum that lands next to a rounding boundary may round to the neighbouring step
    np.testing.assert_allclose(np.asarray(both, np.float32), rounded, rtol=2.0 ** -8, atol=1e-6)


def test_mixed_precision_matrices_beat_a_bfloat16_forward():
    """bfloat16 decoder matrices under float32 activations (model.matrices_as): the norms, embedding
    and unembedding stay float32, and the logits are closer to float32 than an all-bfloat16 forward."""
    cfg = config.tiny(num_key_value_heads=2)
    params = model.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
    mixed = model.matrices_as(params, jnp.bfloat16)
    assert mixed["layers"]["down_proj"].dtype == jnp.bfloat16 and mixed["layers"]["input_layernorm"].dtype == jnp.float32
    assert mixed["embed_tokens"].dtype == jnp.float32
    tokens, mask = padded_batch(np.random.default_rng(0), [40, 20], cfg.vocab_size, "left")
    forward = lambda p, c: model.forward(p, c, jnp.asarray(tokens), jnp.asarray(mask))
    exact = forward(params, cfg)
    got = forward(mixed, cfg)
    all_bf16 = forward(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), cfg.replace(dtype="bfloat16"))
    assert got.dtype == jnp.float32
    assert 0 < rel_err(got, exact, mask) < 0.7 * rel_err(all_bf16, exact, mask)
