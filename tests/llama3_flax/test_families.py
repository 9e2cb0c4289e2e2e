"""Qwen2/2.5 and Mistral in the same pure model: logits parity with transformers' PyTorch
Qwen2ForCausalLM and MistralForCausalLM (eager attention, float32) on tiny random configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model

from .reference import padded_batch, random_tokens, rel_err, torch_logits, torch_model

TOL = 1e-5


def family_model(seed=0, bias_std=0.5, **kw):
    """(cfg, params) of a tiny random model; Qwen2's biases drawn large enough to move the logits."""
    cfg = config.tiny(**kw)
    params = model.init_params(cfg, jax.random.PRNGKey(seed), std=0.1)
    if cfg.qkv_bias:
        keys = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
        layers = dict(params["layers"])
        for key, name in zip(keys, model.QKV_BIAS_NAMES):
            layers[name] = bias_std * jax.random.normal(key, layers[name].shape)
        params = {**params, "layers": layers}
    return cfg, params


def _parity(cfg, params, tokens, mask=None):
    got = np.asarray(model.forward(params, cfg, jnp.asarray(tokens), None if mask is None else jnp.asarray(mask)))
    want = torch_logits(torch_model(cfg, params), tokens, mask)
    where = None if mask is None else mask.astype(bool)
    real = (slice(None),) if where is None else where
    err, abs_err = rel_err(got, want, where), float(np.max(np.abs(got[real] - want[real])))
    print(f"{cfg.architecture}: relative {err:.2g}, max abs {abs_err:.2g}")
    return got, err, abs_err


QWEN2 = {
    "grouped_untied": dict(num_key_value_heads=2),
    "multi_head_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "multi_query": dict(num_key_value_heads=1),
}


@pytest.mark.parametrize("name", sorted(QWEN2))
def test_qwen2_logits_match_transformers(name):
    cfg, params = family_model(architecture="qwen2", rope_theta=1e6, **QWEN2[name])
    assert set(model.QKV_BIAS_NAMES) <= set(params["layers"]) and "o_bias" not in params["layers"]
    tokens, mask = padded_batch(np.random.default_rng(1), [40, 23], cfg.vocab_size, "right")
    got, err, abs_err = _parity(cfg, params, tokens, mask)
    assert err <= TOL and abs_err <= TOL
    # the biases are not vacuous: without them the logits move
    plain = {**params, "layers": {k: (jnp.zeros_like(v) if k in model.QKV_BIAS_NAMES else v)
                                  for k, v in params["layers"].items()}}
    assert rel_err(model.forward(plain, cfg, jnp.asarray(tokens), jnp.asarray(mask)), got, mask) > 1e-2


def test_llama_and_mistral_configs_have_no_bias_leaves():
    for arch in ("llama", "mistral"):
        cfg = config.tiny(architecture=arch)
        assert not cfg.qkv_bias
        assert set(model.init_params(cfg, jax.random.PRNGKey(0))["layers"]) == set(model.LAYER_PARAM_NAMES)
