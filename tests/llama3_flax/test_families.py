"""Qwen2/2.5 and Mistral in the same pure model: logits parity with transformers' PyTorch
Qwen2ForCausalLM and MistralForCausalLM (eager attention, float32) on tiny random configs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax import math as lm

from .reference import padded_batch, random_tokens, rel_err, torch_logits, torch_model

TOL = 1e-5


def family_model(seed=0, bias_std=0.5, std=0.1, **kw):
    """(cfg, params) of a tiny random model (config.tiny(**kw)), drawn with NumPy (no program to
    compile): normal weights, norms near 1, Qwen2's biases large enough to move the logits."""
    cfg = config.tiny(**kw)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        scale = bias_std if "bias" in name else std
        value = 1 + 0.1 * rng.standard_normal(shape) if "norm" in name else scale * rng.standard_normal(shape)
        return jnp.asarray(value, cfg.jnp_dtype)

    shapes = model.param_shapes(cfg)
    return cfg, jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))


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
    "multi_query_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
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


def test_bias_leaves_only_for_qwen2():
    for arch in ("llama", "mistral", "qwen2"):
        cfg = config.tiny(architecture=arch)
        layers = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.PRNGKey(0))["layers"]
        want = model.LAYER_PARAM_NAMES + (model.QKV_BIAS_NAMES if arch == "qwen2" else ())
        assert cfg.qkv_bias is (arch == "qwen2") and set(layers) == set(want) == set(model.layer_param_names(cfg))
    assert layers["k_bias"].shape == (cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim)


# ------------------------------------------------------------------ sliding window
WINDOW = 6  # shorter than the prompts: the window changes the logits


def test_mistral_sliding_window_logits_match_transformers():
    cfg, params = family_model(architecture="mistral", sliding_window=WINDOW, rope_theta=1e4)
    tokens, mask = padded_batch(np.random.default_rng(2), [40, 17], cfg.vocab_size, "right")
    got, err, abs_err = _parity(cfg, params, tokens, mask)
    assert err <= TOL and abs_err <= TOL
    full = model.forward(params, cfg.replace(sliding_window=None), jnp.asarray(tokens), jnp.asarray(mask))
    assert rel_err(full, got, mask) > 1e-2  # the window is not vacuous


def test_qwen2_window_on_every_layer_matches_transformers():
    """Qwen2 with use_sliding_window and max_window_layers 0: one window on every layer, honoured."""
    cfg, params = family_model(architecture="qwen2", sliding_window=WINDOW, rope_theta=1e6)
    hf = cfg.to_hf()
    assert hf["use_sliding_window"] and hf["max_window_layers"] == 0
    assert config.LlamaConfig.from_hf(hf) == cfg
    tokens = random_tokens(np.random.default_rng(3), 2, 30, cfg.vocab_size)
    _, err, abs_err = _parity(cfg, params, tokens)
    assert err <= TOL and abs_err <= TOL


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(params, cfg, tokens, mask):
    return model.run_layers(params, cfg, model.embed(params, tokens), mask)[0]


# the programs under test, compiled once each (eager dispatch compiles every primitive on its own)
_cached = jax.jit(model.run_layers_cached, static_argnames=("cfg",))
_layer = jax.jit(model.decoder_layer, static_argnames=("cfg", "query_block"))
_context = jax.jit(model.layer_context, static_argnames=("cfg",))


def _hidden(cfg, params, seqs, width=16):
    """The residual stream after the last layer of each sequence alone (rows right-padded to one shape,
    which causal attention never lets a real token see)."""
    tokens, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1
    h = np.asarray(_run(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    return [h[i, :len(s)] for i, s in enumerate(seqs)]


def test_window_through_a_kv_cache_and_query_blocks():
    """Left-padded prompts in a KV cache (slots != RoPE positions) and a decoding step (generation), and
    attention in query blocks (corpus statistics): each equals the plain forward of the unpadded
    sequence. (The value loop's prefix caches and packed suffixes, and scoring's packed prefix trees,
    are checked against transformers in tests/jaxedit/editing/test_families_vs_torch.py.)"""
    cfg, params = family_model(architecture="mistral", sliding_window=4, num_hidden_layers=3, seed=5)
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(3, cfg.vocab_size, n)) for n in (11, 7)]
    width, extra = 11, 1
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):], mask[i, width - len(s):] = s, 1
    positions = model.rope_positions(jnp.asarray(mask))
    lengths = mask.sum(1)
    key_positions = jnp.concatenate([positions, jnp.asarray(lengths)[:, None]], axis=1)
    key_mask = jnp.concatenate([jnp.asarray(mask), jnp.zeros((2, extra), jnp.int32)], axis=1)
    caches = model.empty_kv_cache(cfg, 2, width + extra)
    slots = jnp.broadcast_to(jnp.arange(width), (2, width))
    h, caches = _cached(params, cfg, model.embed(params, jnp.asarray(tokens)), positions, slots, key_mask, caches,
                        key_positions=key_positions)
    nxt = rng.integers(3, cfg.vocab_size, 2)
    step, _ = _cached(params, cfg, model.embed(params, jnp.asarray(nxt[:, None])), jnp.asarray(lengths)[:, None],
                      jnp.full((2, 1), width), key_mask.at[:, width].set(1), caches, key_positions=key_positions)
    alone = _hidden(cfg, params, [s + [int(nxt[i])] for i, s in enumerate(seqs)])
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(np.asarray(h[i, width - len(s):]), alone[i][:-1], atol=TOL)
        np.testing.assert_allclose(np.asarray(step[i, 0]), alone[i][-1], atol=TOL)
    with pytest.raises(ValueError, match="sliding window of 4 positions; pass key_positions"):
        model.run_layers_cached(params, cfg, model.embed(params, jnp.asarray(tokens)), positions, slots,
                                key_mask, caches)
    with pytest.raises(ValueError, match="needs the RoPE positions"):
        lm.attention_bias(slots, slots, jnp.asarray(mask), window=4)

    x = model.embed(params, jnp.asarray([seqs[0]]))
    cos, sin, bias = _context(cfg, jnp.ones((1, width), jnp.int32))
    layer0 = jax.tree_util.tree_map(lambda w: w[0], params["layers"])
    whole = _layer(cfg, layer0, x, cos, sin, bias)[0]
    blocked = _layer(cfg, layer0, x, cos, sin, bias, query_block=4)[0]
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=TOL)


# ------------------------------------------------------------------ configs
# config.json of released checkpoints, as published on the Hugging Face hub.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
TINYLLAMA_CHAT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000,
}
QWEN2_5_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
MISTRAL_7B_INSTRUCT_V0_3 = {**MISTRAL_7B_V0_1, "rope_theta": 1000000.0, "sliding_window": None,
                            "vocab_size": 32768, "transformers_version": "4.42.0.dev0"}


@pytest.mark.parametrize("hf, preset", [(LLAMA2_7B, "llama2-7b"), (TINYLLAMA_CHAT, "tinyllama-1.1b"),
                                        (QWEN2_5_7B_INSTRUCT, "qwen2.5-7b"), (MISTRAL_7B_V0_1, "mistral-7b")])
def test_published_configs_read_as_the_presets(hf, preset):
    cfg = config.LlamaConfig.from_hf(hf)
    assert cfg == config.PRESETS[preset](dtype="float32")
    assert cfg.to_hf()["architectures"] == hf["architectures"] and cfg.to_hf()["model_type"] == hf["model_type"]


def test_family_details():
    llama2 = config.LlamaConfig.from_hf(LLAMA2_7B)
    assert (llama2.rope_theta, llama2.rope_scaling, llama2.num_key_value_heads) == (10000.0, None, 32)  # MHA
    qwen = config.LlamaConfig.from_hf(QWEN2_5_0_5B)
    assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.sliding_window is None and qwen.rope_theta == 1e6
    assert "lm_head" not in model.param_shapes(qwen) and model.param_shapes(qwen)["layers"]["k_bias"] == (24, 128)
    # Qwen2 windows the layers from max_window_layers on: none of Qwen2.5-7B's 28, a 64-token one on all
    unused = config.LlamaConfig.from_hf({**QWEN2_5_7B_INSTRUCT, "use_sliding_window": True})
    assert unused.sliding_window is None
    every = {**QWEN2_5_7B_INSTRUCT, "use_sliding_window": True, "max_window_layers": 0, "sliding_window": 64}
    assert config.LlamaConfig.from_hf(every).sliding_window == 64
    v03 = config.LlamaConfig.from_hf(MISTRAL_7B_INSTRUCT_V0_3)
    assert v03.architecture == "mistral" and v03.sliding_window is None and not v03.qkv_bias
    assert config.PRESETS["llama3.1-8b"]().rope_scaling == config.RopeScaling(8.0, 1.0, 4.0, 8192)
    # a Llama config prints (and so fingerprints jaxedit's caches) without the family fields
    assert "architecture" not in repr(llama2) and "architecture='qwen2'" in repr(qwen)
    assert "sliding_window=4096" in repr(config.mistral_7b())


@pytest.mark.parametrize("arch, window", [("qwen2", None), ("qwen2", 8), ("mistral", 8), ("mistral", None)])
def test_to_hf_round_trips_through_transformers(arch, window):
    from transformers import AutoConfig

    cfg = config.tiny(architecture=arch, sliding_window=window, tie_word_embeddings=arch == "qwen2",
                      dtype="bfloat16")
    hf = cfg.to_hf()
    assert config.LlamaConfig.from_hf(hf, dtype="bfloat16") == cfg
    theirs = AutoConfig.for_model(hf.pop("model_type"), **hf)  # what transformers 5 makes of it
    assert theirs.sliding_window == window
    assert config.LlamaConfig.from_hf(theirs.to_diff_dict(), dtype="bfloat16") == cfg
    saved = {k: v for k, v in theirs.to_dict().items() if k not in
             ("chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type")}
    assert config.LlamaConfig.from_hf(saved, dtype="bfloat16") == cfg


@pytest.mark.parametrize("hf, message", [
    ({**LLAMA2_7B, "architectures": ["GemmaForCausalLM"]}, r"architecture 'GemmaForCausalLM' is not supported"),
    ({**LLAMA2_7B, "architectures": None, "model_type": "qwen3"}, r"model_type 'qwen3' is not supported"),
    ({**MISTRAL_7B_V0_1, "model_type": "llama"}, r"model_type 'llama' and architectures \['MistralForCausalLM'\]"),
    ({**QWEN2_5_7B_INSTRUCT, "use_mrope": False}, r"unsupported config keys \['use_mrope'\] for model_type 'qwen2'"),
    ({**QWEN2_5_7B_INSTRUCT, "attention_bias": True}, r"unsupported config keys \['attention_bias'\]"),
    ({**MISTRAL_7B_V0_1, "max_window_layers": 4}, r"unsupported config keys \['max_window_layers'\] for model_type"),
    ({**LLAMA2_7B, "sliding_window": 4096}, r"unsupported config keys \['sliding_window'\]"),
    ({**QWEN2_5_7B_INSTRUCT, "use_sliding_window": True, "max_window_layers": 0, "sliding_window": None},
     r"use_sliding_window is set but sliding_window is missing"),
    ({**QWEN2_5_7B_INSTRUCT, "use_sliding_window": True, "max_window_layers": 21},
     r"sliding-window attention on layers 21..27 only .* is not supported"),
    ({**QWEN2_5_7B_INSTRUCT, "layer_types": ["full_attention"] * 27 + ["sliding_attention"]},
     r"layers 27..27 only"),
    ({**QWEN2_5_7B_INSTRUCT, "layer_types": ["chunked_attention"] * 28}, r"layer_types must list"),
    ({**MISTRAL_7B_V0_1, "hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
])
def test_unknown_families_and_keys_are_refused_by_name(hf, message):
    with pytest.raises(ValueError, match=message):
        config.LlamaConfig.from_hf(hf)


def test_bad_family_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown architecture 'gpt2': expected one of \['llama', 'mistral', 'qwen2'\]"):
        config.tiny(architecture="gpt2")
    with pytest.raises(ValueError, match="sliding_window is not part of the llama architecture"):
        config.tiny(sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window must be a positive number of tokens, got 0"):
        config.tiny(architecture="mistral", sliding_window=0)
