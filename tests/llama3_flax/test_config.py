"""LlamaConfig: reading Hugging Face config dicts (old and new styles), rejections, presets."""
import math

import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax.config import LlamaConfig, RopeScaling

# The config.json files of the released checkpoints (as published on the Hugging Face hub).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
LLAMA3_1_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256,
}
LLAMA3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}
# transformers >= 5 writes rope_parameters (with rope_theta inside) instead of rope_theta + rope_scaling.
LLAMA3_2_1B_V5 = {k: v for k, v in LLAMA3_2_1B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
LLAMA3_2_1B_V5.update(dtype="bfloat16", transformers_version="5.0.0", rope_parameters={
    "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rope_type": "llama3"})
SMOLLM2_V5 = {k: v for k, v in SMOLLM2_135M_INSTRUCT.items() if k not in ("rope_scaling", "rope_theta")}
SMOLLM2_V5["rope_parameters"] = {"rope_theta": 100000, "rope_type": "default"}


def _f32(preset):
    return preset(dtype="float32")


def test_llama3_8b():
    cfg = LlamaConfig.from_hf(LLAMA3_8B)
    assert cfg == _f32(config.llama3_8b)
    assert cfg.head_dim == 128 and cfg.rope_scaling is None and cfg.dtype == "float32"


def test_llama3_1_instruct_with_rope_scaling_and_eos_list():
    cfg = LlamaConfig.from_hf(LLAMA3_1_8B_INSTRUCT, dtype="bfloat16")
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_id == (128001, 128008, 128009)
    assert cfg.max_position_embeddings == 131072 and cfg.dtype == "bfloat16"
    assert cfg == config.llama3_8b().replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                                             max_position_embeddings=131072, eos_token_id=(128001, 128008, 128009))
    hash(cfg)  # usable as a jit static argument


@pytest.mark.parametrize("hf", [LLAMA3_2_1B, LLAMA3_2_1B_V5], ids=["rope_scaling", "rope_parameters"])
def test_llama3_2_1b(hf):
    cfg = LlamaConfig.from_hf(hf)
    assert cfg == _f32(config.llama3_2_1b)
    assert cfg.rope_scaling.factor == 32.0 and cfg.rope_theta == 500000.0


@pytest.mark.parametrize("hf", [SMOLLM2_135M_INSTRUCT, SMOLLM2_V5], ids=["rope_theta", "rope_parameters"])
def test_smollm2(hf):
    cfg = LlamaConfig.from_hf(hf)
    assert cfg == config.smollm2_135m()
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.head_dim == 64


def test_defaults_for_optional_keys():
    minimal = {k: LLAMA3_8B[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads")}
    cfg = LlamaConfig.from_hf(minimal)
    assert cfg.num_key_value_heads == 32  # multi-head attention when not given
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None and not cfg.tie_word_embeddings


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 32)])
@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_round_trips_through_transformers(scaling, tied):
    from transformers import LlamaConfig as HFConfig

    cfg = config.tiny(rope_scaling=scaling, tie_word_embeddings=tied, dtype="bfloat16")
    assert LlamaConfig.from_hf(cfg.to_hf(), dtype="bfloat16") == cfg
    hf = HFConfig(**cfg.to_hf())  # what transformers 5 makes of it (rope_parameters) reads back the same
    assert hf.num_key_value_heads == cfg.num_key_value_heads and hf.head_dim == cfg.head_dim
    assert LlamaConfig.from_hf(hf.to_diff_dict(), dtype="bfloat16") == cfg
    saved = {k: v for k, v in hf.to_dict().items() if k not in
             ("chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type")}
    assert LlamaConfig.from_hf(saved, dtype="bfloat16") == cfg


# ------------------------------------------------------------------ rejections
def _bad(**changes):
    hf = dict(LLAMA3_1_8B_INSTRUCT)
    for k, v in changes.items():
        if v is _DROP:
            hf.pop(k)
        else:
            hf[k] = v
    return hf


_DROP = object()


@pytest.mark.parametrize("hf, message", [
    (_bad(sliding_window=4096), r"unsupported config keys \['sliding_window'\]"),
    (_bad(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (_bad(attention_bias=True), r"attention_bias=True is not supported"),
    (_bad(mlp_bias=True), r"mlp_bias=True is not supported"),
    (_bad(pretraining_tp=2), r"pretraining_tp=2 is not supported"),
    (_bad(rope_interleaved=True), r"rope_interleaved=True is not supported"),
    (_bad(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope scaling type 'linear' is not supported"),
    (_bad(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope scaling type 'dynamic' is not supported"),
    (_bad(rope_scaling={**LLAMA3_1_8B_INSTRUCT["rope_scaling"], "beta_fast": 32}),
     r"unsupported rope scaling keys \['beta_fast'\]"),
    (_bad(rope_scaling=_DROP, rope_theta=_DROP, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     r"rope scaling type 'yarn' is not supported"),
    (_bad(hidden_size=_DROP), r"missing required keys \['hidden_size'\]"),
    (_bad(vocab_size=_DROP, num_hidden_layers=_DROP), r"missing required keys \['vocab_size', 'num_hidden_layers'\]"),
    (_bad(num_key_value_heads=5), r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"),
    (_bad(num_hidden_layers=0), r"num_hidden_layers must be positive, got 0"),
])
def test_from_hf_rejects_with_a_clear_message(hf, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(hf)


def test_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16, got 'int8'"):
        LlamaConfig.from_hf(LLAMA3_8B, dtype="int8")


def test_heads_not_divisible_direct():
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\) must be a multiple of num_key_value_heads \(2\)"):
        config.smollm2_135m().replace(num_key_value_heads=2)


# --------------------------------------------------------------------- presets
def _count(cfg) -> int:
    shapes = model.param_shapes(cfg)
    leaves = [v for v in shapes["layers"].values()] + [v for k, v in shapes.items() if k != "layers"]
    return sum(math.prod(s) for s in leaves)


@pytest.mark.parametrize("name, count", [("llama3-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400),
                                         ("smollm2-135m", 134_515_008)])
def test_preset_parameter_counts(name, count):
    cfg = config.PRESETS[name]()
    assert _count(cfg) == count


def test_preset_sizes():
    c = config.llama3_8b()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size, c.dtype) == (4096, 32, 32, 8, 128, 128256, "bfloat16")
    assert model.param_shapes(c)["layers"]["k_proj"] == (32, 1024, 4096)
    assert model.param_shapes(config.llama3_2_1b())["layers"]["q_proj"] == (16, 2048, 2048)
    assert "lm_head" not in model.param_shapes(config.llama3_2_1b())
    t = config.tiny()
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (64, 4, 2, 16)
    assert model.num_params(model.init_params(t, np.zeros(2, np.uint32))) == _count(t)


def test_max_position_embeddings_of_presets_and_tiny():
    assert config.smollm2_135m().max_position_embeddings == 8192
    assert config.tiny().max_position_embeddings == 256
    assert config.tiny(max_position_embeddings=16).max_position_embeddings == 16
    with pytest.raises(ValueError, match="max_position_embeddings must be positive, got 0"):
        config.tiny().replace(max_position_embeddings=0)
