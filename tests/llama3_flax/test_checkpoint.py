"""Checkpoint round trips through Hugging Face folders, and clear errors for bad checkpoints."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import checkpoint, config, model
from llama3_flax.checkpoint import CheckpointError

from .reference import random_tokens, rel_err, torch_logits

TOL = 1e-5


def _tree_equal(a, b) -> bool:
    """Same structure, dtypes and values, exactly."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _tiny(tied=False, seed=0, **kw):
    cfg = config.tiny(tie_word_embeddings=tied, **kw)
    return cfg, model.init_params(cfg, jax.random.PRNGKey(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_saved_folder_loads_in_transformers(tmp_path, tied):
    import torch
    from transformers import LlamaForCausalLM

    cfg, params = _tiny(tied, rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 32))
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    tokens = random_tokens(np.random.default_rng(0), 2, 40, cfg.vocab_size)
    got = model.forward(params, cfg, jnp.asarray(tokens))
    assert rel_err(got, torch_logits(hf, tokens)) <= TOL
    # and back: the folder loads into exactly the same params and config
    cfg2, params2 = checkpoint.load_hf_folder(tmp_path)
    assert cfg2 == cfg
    assert _tree_equal(params2, params)


def test_sharded_save_loads_back_exactly(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint.hf_state_dict_from_params(params, cfg))
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    cfg2, params2 = checkpoint.load_hf_folder(tmp_path)
    assert cfg2 == cfg and _tree_equal(params2, params)


def test_sharded_folder_loads_in_transformers(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    cfg, params = _tiny(tied=True)
    checkpoint.save_hf_folder(tmp_path, params, cfg, max_shard_bytes=40_000)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = random_tokens(np.random.default_rng(1), 1, 12, cfg.vocab_size)
    assert rel_err(model.forward(params, cfg, jnp.asarray(tokens)), torch_logits(hf, tokens)) <= TOL


def test_bfloat16_round_trip(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    cfg, params = _tiny(dtype="bfloat16")
    assert params["layers"]["q_proj"].dtype == jnp.bfloat16
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, params2 = checkpoint.load_hf_folder(tmp_path, dtype="bfloat16")
    assert cfg2 == cfg and _tree_equal(params2, params)
    # transformers reads the same bfloat16 values
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy(),
                                  np.asarray(params["layers"]["down_proj"][1], np.float32))
    # loading as float32 is exact too (bfloat16 -> float32 is lossless)
    _, params32 = checkpoint.load_hf_folder(tmp_path, dtype="float32")
    assert params32["embed_tokens"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params32["embed_tokens"]), np.asarray(params["embed_tokens"], np.float32))
    # and the bfloat16 forward is close to the float32 forward on the same (bfloat16-representable) weights
    tokens = jnp.asarray(random_tokens(np.random.default_rng(2), 1, 16, cfg.vocab_size))
    lo = model.forward(params, cfg, tokens)
    hi = model.forward(params32, cfg.replace(dtype="float32"), tokens)
    assert lo.dtype == jnp.float32
    assert rel_err(lo, hi) < 0.05


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16"])
def test_loads_transformers_save_pretrained(tmp_path, tied, torch_dtype):
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    cfg = config.tiny(num_key_value_heads=1, tie_word_embeddings=tied,
                      rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 32))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**cfg.to_hf())).eval()
    with torch.no_grad():  # norms away from 1 so that their weights are tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = hf.to(getattr(torch, torch_dtype))
    hf.save_pretrained(str(tmp_path))
    cfg2, params = checkpoint.load_hf_folder(tmp_path)
    assert cfg2 == cfg
    assert ("lm_head" in params) == (not tied)
    tokens = random_tokens(np.random.default_rng(3), 2, 40, cfg.vocab_size)
    got = model.forward(params, cfg2, jnp.asarray(tokens))
    assert rel_err(got, torch_logits(hf.float(), tokens)) <= TOL


def test_hf_state_dict_round_trip_is_exact():
    cfg, params = _tiny()
    state = checkpoint.hf_state_dict_from_params(params, cfg)
    assert len(state) == 3 + 9 * cfg.num_hidden_layers
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    np.testing.assert_array_equal(state["model.layers.1.mlp.up_proj.weight"], params["layers"]["up_proj"][1])
    assert _tree_equal(checkpoint.params_from_hf_state_dict(state, cfg), params)


# ----------------------------------------------------------------- bad checkpoints
def _state(tied=False):
    cfg, params = _tiny(tied)
    return cfg, dict(checkpoint.hf_state_dict_from_params(params, cfg))


def test_missing_tensor_is_named():
    cfg, state = _state()
    del state["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.1\.mlp\.gate_proj\.weight'\]"):
        checkpoint.params_from_hf_state_dict(state, cfg)


def test_missing_lm_head_of_untied_config_is_named():
    cfg, state = _state(tied=False)
    del state["lm_head.weight"]
    with pytest.raises(CheckpointError, match="missing tensors.*lm_head.weight"):
        checkpoint.params_from_hf_state_dict(state, cfg)


def test_unexpected_tensor_is_named():
    cfg, state = _state()
    state["model.layers.2.mlp.gate_proj.weight"] = state["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model\.layers\.2\.mlp\.gate_proj\.weight'\]"):
        checkpoint.params_from_hf_state_dict(state, cfg)


def test_misshaped_tensor_is_named():
    cfg, state = _state()
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\)"
                                              r".*\(32, 64\)"):
        checkpoint.params_from_hf_state_dict(state, cfg)


def test_tied_checkpoint_with_different_lm_head_is_rejected():
    cfg, state = _state(tied=True)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        checkpoint.params_from_hf_state_dict(state, cfg)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()  # an identical copy is accepted
    assert "lm_head" not in checkpoint.params_from_hf_state_dict(state, cfg)


def test_missing_tensor_in_folder(tmp_path):
    from safetensors.numpy import save_file

    cfg, state = _state()
    checkpoint.save_hf_folder(tmp_path, checkpoint.params_from_hf_state_dict(state, cfg), cfg)
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        checkpoint.load_hf_folder(tmp_path)


def test_folder_without_config(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load_hf_folder(tmp_path)


def test_folder_without_weights(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        checkpoint.load_hf_folder(tmp_path)


@pytest.mark.parametrize("cut", ["half", "header", "empty", "last_bytes"])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "header": data[:6], "empty": b"",
                      "last_bytes": data[:-3]}[cut])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_hf_folder(tmp_path)


def test_garbage_safetensors_names_the_file(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        checkpoint.load_hf_folder(tmp_path)


def test_shard_missing_from_index(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        checkpoint.load_hf_folder(tmp_path)


def test_config_with_wrong_sizes_for_the_weights(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(96, 64\).*\(128, 64\)"):
        checkpoint.load_hf_folder(tmp_path)


def test_load_model_unknown_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        checkpoint.load_model(tmp_path / "nothing_here")


# ------------------------------------------------------------- non-finite weights, unreadable files
def test_nan_weight_in_folder_is_named(tmp_path):
    cfg, params = _tiny()
    params = dict(params, layers=dict(params["layers"]))
    params["layers"]["down_proj"] = params["layers"]["down_proj"].at[1, 0, :3].set(jnp.nan)
    params["layers"]["down_proj"] = params["layers"]["down_proj"].at[1, 2, 0].set(jnp.inf)
    checkpoint.save_hf_folder(tmp_path, _tiny()[1], cfg)  # the writer refuses NaN: write the file past it
    from safetensors.numpy import save_file
    save_file(checkpoint.hf_state_dict_from_params(params, cfg), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight has 4 non-finite"):
        checkpoint.load_hf_folder(tmp_path)


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of checkpoint._unpermute_rope)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, cfg, params):
    """A float32 llama GGUF file of params, written with the gguf package as llama.cpp lays it out."""
    import gguf

    state = checkpoint.hf_state_dict_from_params(params, cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            a = state[f"model.layers.{i}.{hf}"]
            if g == "attn_q":
                a = _permute_rope(a, cfg.num_attention_heads)
            elif g == "attn_k":
                a = _permute_rope(a, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("cut", ["magic", "header", "metadata", "data", "last_bytes"])
def test_truncated_gguf_names_the_file(tmp_path, cut):
    cfg, params = _tiny()
    path = _write_gguf(tmp_path / "tiny.gguf", cfg, params)
    cfg2, params2 = checkpoint.load_gguf(path)  # whole, the file loads exactly
    assert cfg2.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # GGUF stores it as float32
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg and _tree_equal(params2, params)
    data = path.read_bytes()
    n = {"magic": 3, "header": 20, "metadata": 200, "data": len(data) // 2, "last_bytes": len(data) - 5}[cut]
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf.*truncated or corrupt"):
        checkpoint.load_gguf(path)


def test_inf_weight_in_gguf_is_named(tmp_path):
    cfg, params = _tiny()
    params = dict(params, embed_tokens=params["embed_tokens"].at[5, 1].set(-jnp.inf))
    path = _write_gguf(tmp_path / "tiny.gguf", cfg, params)
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight has 1 non-finite"):
        checkpoint.load_gguf(path)


def test_config_json_that_is_not_json_names_file_line_and_column(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    (tmp_path / "config.json").write_text('{\n "vocab_size": 128,\n "hidden_size" 64\n}')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON: .* line 3, column 16"):
        checkpoint.load_hf_folder(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"sliding_window": 4096}, r"unsupported config keys \['sliding_window'\]"),
    ({"vocab_size": "many"}, "invalid literal"),
])
def test_config_json_that_from_hf_rejects_names_the_file(tmp_path, change, message):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*" + message):
        checkpoint.load_hf_folder(tmp_path)


def test_config_json_holding_a_list_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list"):
        checkpoint.read_config(tmp_path / "config.json")


def test_folder_without_tokenizer_files_says_which(tmp_path):
    cfg, params = _tiny()
    checkpoint.save_hf_folder(tmp_path, params, cfg)  # no tokenizer given: weights and config only
    for load in (checkpoint.load_tokenizer, checkpoint.load_model):
        with pytest.raises(CheckpointError, match=r"no tokenizer files: it needs tokenizer\.json .*tokenizer\.model"
                                                  r".*tokenizer_config\.json.*save_hf_folder"):
            load(tmp_path)


def _word_level_tokenizer(n_words: int):
    """A transformers fast tokenizer of n_words + 3 tokens, built in memory (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(n_words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_load_model_rejects_a_tokenizer_bigger_than_the_vocabulary(tmp_path):
    cfg, params = _tiny()  # vocab_size 128
    checkpoint.save_hf_folder(tmp_path / "ok", params, cfg, tokenizer=_word_level_tokenizer(100))
    cfg2, _, tok = checkpoint.load_model(tmp_path / "ok")
    assert len(tok) == 103 and cfg2 == cfg
    checkpoint.save_hf_folder(tmp_path / "big", params, cfg)  # the writer refuses the big tokenizer: add it after
    _word_level_tokenizer(200).save_pretrained(str(tmp_path / "big"))
    with pytest.raises(ValueError, match="the tokenizer has 203 tokens but the model's vocab_size is 128"):
        checkpoint.load_model(tmp_path / "big")
