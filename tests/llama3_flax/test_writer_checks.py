"""Writers refuse what the loaders would refuse, before a byte is written; sharding refuses params made
for another config."""
import os

import gguf
import jax
import jax.numpy as jnp
import pytest

from jaxedit import testing
from llama3_flax import checkpoint, gguf_export, sharding
from llama3_flax.checkpoint import CheckpointError


def _with_nan(params):
    layers = dict(params["layers"])
    layers["down_proj"] = layers["down_proj"].at[1, 0, :3].set(jnp.nan)
    return dict(params, layers=layers)


@pytest.fixture(scope="module")
def tiny():
    cfg, params, _ = testing.tiny_model(num_hidden_layers=2, vocab_size=128)
    return cfg, params


@pytest.fixture(scope="module")
def vocabulary():
    """GGUF tokenizer metadata of exactly 128 tokens (the tiny model's vocabulary)."""
    tokens = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    V = gguf.GGUFValueType
    return gguf_export.TokenizerMetadata(fields=(
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", [1] * len(tokens), V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", ["w 0"], V.ARRAY, V.STRING),
    ))


def test_a_model_with_nan_weights_is_not_written_as_gguf(tiny, vocabulary, tmp_path):
    cfg, params = tiny
    gguf_export.save_gguf(tmp_path / "ok.gguf", params, cfg, tokenizer_source=vocabulary)  # finite: written
    with pytest.raises(gguf_export.GGUFExportError,
                       match=r"params\['layers'\]\['down_proj'\] has 3 non-finite \(NaN/Inf\) values in layer\(s\) \[1\]"):
        gguf_export.save_gguf(tmp_path / "nan.gguf", _with_nan(params), cfg, tokenizer_source=vocabulary)
    assert sorted(os.listdir(tmp_path)) == ["ok.gguf"]


def test_a_model_with_nan_weights_is_not_written_as_an_hf_folder(tiny, tmp_path):
    cfg, params = tiny
    with pytest.raises(CheckpointError, match=r"params\['layers'\]\['down_proj'\] has 3 non-finite"):
        checkpoint.save_hf_folder(tmp_path / "nan", _with_nan(params), cfg)
    assert not (tmp_path / "nan").exists()


def test_hf_writer_refuses_another_config_a_gguf_name_and_a_used_folder(tiny, tmp_path):
    cfg, params = tiny
    with pytest.raises(CheckpointError, match=r"params\['layers'\]\['input_layernorm'\] has shape \(2, 64\), the config "
                                              r"implies \(3, 64\)"):
        checkpoint.save_hf_folder(tmp_path / "other", params, cfg.replace(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="named .gguf would be read as a GGUF file"):
        checkpoint.save_hf_folder(tmp_path / "edited.gguf", params, cfg)
    checkpoint.save_hf_folder(tmp_path / "used", params, cfg)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        checkpoint.save_hf_folder(tmp_path / "used", params, cfg)
    assert sorted(os.listdir(tmp_path)) == ["used"]


def test_hf_writer_refuses_a_tokenizer_bigger_than_the_vocabulary(tiny, tmp_path):
    cfg, params = tiny
    with pytest.raises(CheckpointError, match="the tokenizer has 200 tokens but the model's vocab_size is 128"):
        checkpoint.save_hf_folder(tmp_path / "big", params, cfg, tokenizer=testing.WordTokenizer(200))
    assert not (tmp_path / "big").exists()


def test_gguf_writer_refuses_a_folder_of_that_name(tiny, vocabulary, tmp_path):
    cfg, params = tiny
    (tmp_path / "edited.gguf").mkdir()
    with pytest.raises(gguf_export.GGUFExportError, match="is a folder"):
        gguf_export.save_gguf(tmp_path / "edited.gguf", params, cfg, tokenizer_source=vocabulary)


@pytest.mark.parametrize("change", ["more layers", "wider MLP", "tied embeddings"])
def test_params_of_another_config_are_not_laid_out_on_a_mesh(tiny, change):
    cfg, params = tiny
    other = {"more layers": cfg.replace(num_hidden_layers=4), "wider MLP": cfg.replace(intermediate_size=192),
             "tied embeddings": cfg.replace(tie_word_embeddings=True)}[change]
    mesh = sharding.make_mesh(1, 1)
    with pytest.raises(ValueError, match="params of another model, or the wrong config"):
        sharding.shard_params(params, other, mesh)
    placed = sharding.shard_params(params, cfg, mesh)
    assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(params)
