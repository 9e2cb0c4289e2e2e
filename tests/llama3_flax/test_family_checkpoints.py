"""Qwen2 and Mistral checkpoints: HF folders, GGUF files (llama.cpp's qwen2 and llama architectures)
and hub ids, saved and loaded back exactly, and read by transformers with the same logits."""
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import checkpoint, config, gguf_export, model

from .reference import padded_batch, rel_err, torch_logits
from .test_families import family_model
from .test_hub import _hub_cache

VOCAB = 320
TEXTS = ["The mother tongue of Danielle Darrieux is French.", "Toko Yasuda plays the piano and the guitar.",
         "In 1995 the city of Paris had 2153000 people."]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """A small byte-level BPE with Qwen2's pre-tokenizer (digits split one by one), trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(arch, window=None, tied=False):
    cfg, params = family_model(architecture=arch, sliding_window=window, vocab_size=VOCAB, tie_word_embeddings=tied)
    return cfg.replace(bos_token_id=None, eos_token_id=VOCAB - 9, pad_token_id=VOCAB - 9), params


def _assert_same(params, back):
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(back)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arch, window", [("qwen2", None), ("mistral", 6)])
def test_hf_folder_round_trip_and_transformers(tmp_path, qwen_tokenizer, arch, window):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params = _tiny(arch, window)
    folder = checkpoint.save_hf_folder(tmp_path / "ours", params, cfg, tokenizer=qwen_tokenizer)
    cfg2, params2, _ = checkpoint.load_model(folder)
    assert cfg2 == cfg
    _assert_same(params, params2)
    # transformers reads the folder as its own Qwen2/Mistral model, with the same logits
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == config.ARCHITECTURES[arch]
    tokens, mask = padded_batch(np.random.default_rng(0), [24, 9], cfg.vocab_size, "right")
    ours = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    assert rel_err(ours, torch_logits(hf, tokens, mask), mask) <= 1e-5
    # and what transformers saves reads back
    hf.save_pretrained(str(tmp_path / "theirs"))
    cfg3, params3 = checkpoint.load_hf_folder(tmp_path / "theirs")
    assert cfg3 == cfg
    _assert_same(params, params3)


@pytest.mark.parametrize("arch, window", [("qwen2", None), ("mistral", 6)])
def test_gguf_round_trip(tmp_path, qwen_tokenizer, arch, window):
    cfg, params = _tiny(arch, window, tied=arch == "mistral")
    path = gguf_export.save_gguf(tmp_path / f"{arch}.gguf", params, cfg, tokenizer_source=qwen_tokenizer)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    want_arch = {"qwen2": "qwen2", "mistral": "llama"}[arch]
    assert reader.fields["general.architecture"].contents() == want_arch
    assert ("blk.1.attn_q.bias" in names) is (arch == "qwen2") and "blk.1.attn_output.bias" not in names
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"

    cfg2, params2, tok2 = checkpoint.load_model(path)
    assert cfg2.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # stored as float32
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
    _assert_same(params, params2)
    tokens = jnp.asarray(qwen_tokenizer(TEXTS, padding=True, return_tensors="np")["input_ids"])
    np.testing.assert_array_equal(model.forward(params2, cfg2, tokens), model.forward(params, cfg, tokens))
    text = "Call 12345 now, Paris"  # digits one by one, as Qwen2 splits them
    assert tok2(text)["input_ids"] == qwen_tokenizer(text)["input_ids"]
    if arch == "qwen2":
        # transformers' GGUF loader reads llama.cpp's qwen2 layout (biases, q/k rows unpermuted) the same
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        assert type(hf).__name__ == "Qwen2ForCausalLM"
        assert rel_err(model.forward(params, cfg, tokens), torch_logits(hf, np.asarray(tokens))) <= 1e-5


@pytest.mark.parametrize("scaling", [config.RopeScaling(8.0, 1.0, 4.0, 64), config.RopeScaling(32.0, 1.0, 4.0, 16)])
def test_gguf_llama3_rope_scaling_reads_back(tmp_path, qwen_tokenizer, scaling):
    cfg = config.tiny(vocab_size=VOCAB, rope_scaling=scaling)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    cfg2, params2 = checkpoint.load_gguf(gguf_export.save_gguf(tmp_path / "s.gguf", params, cfg,
                                                               tokenizer_source=qwen_tokenizer))
    assert cfg2.rope_scaling == scaling
    _assert_same(params, params2)


def test_hub_id_of_a_qwen2_model(tmp_path, qwen_tokenizer, monkeypatch):
    cfg, params = _tiny("qwen2")
    folder = checkpoint.save_hf_folder(tmp_path / "folder", params, cfg, tokenizer=qwen_tokenizer)
    home = tmp_path / "hf_home"
    _hub_cache(home, "Qwen/Qwen2.5-Tiny", folder)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg2, params2, _ = checkpoint.load_model("Qwen/Qwen2.5-Tiny")
    assert cfg2 == cfg and cfg2.qkv_bias
    _assert_same(params, params2)


def test_bad_checkpoints_are_named(tmp_path, qwen_tokenizer, monkeypatch):
    cfg, params = _tiny("qwen2")
    state = checkpoint.hf_state_dict_from_params(params, cfg)
    del state["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(checkpoint.CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"):
        checkpoint.params_from_hf_state_dict(state, cfg)
    folder = checkpoint.save_hf_folder(tmp_path / "folder", params, cfg, tokenizer=qwen_tokenizer)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"qwen2"', '"qwen3"'))
    with pytest.raises(checkpoint.CheckpointError, match=r"config.json: .*model_type 'qwen3' is not supported"):
        checkpoint.load_model(folder)
    # a llama-architecture GGUF file holding q/k/v biases: refused by name, not read without them
    monkeypatch.setattr(gguf_export, "gguf_architecture", lambda c: "llama")
    path = gguf_export.save_gguf(tmp_path / "biased.gguf", params, cfg, tokenizer_source=qwen_tokenizer)
    with pytest.raises(checkpoint.CheckpointError, match=r"tensors \['blk.0.attn_k.bias', .* are not part of the llama"):
        checkpoint.load_gguf(path)
    writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(checkpoint.CheckpointError, match=r"GGUF architecture 'gemma' is not supported"):
        checkpoint.load_gguf(tmp_path / "gemma.gguf")


def test_qwen2_onto_a_mesh(tmp_path, qwen_tokenizer):
    """The sharding rules cover the bias leaves (heads over the model axis), and a Qwen2 folder loads
    straight onto a mesh as load_hf_folder loads it."""
    from jax.sharding import PartitionSpec

    from llama3_flax import sharding

    cfg, params = _tiny("qwen2")
    mesh = sharding.make_mesh(1, 1)
    specs = sharding.param_shardings(cfg, mesh)
    assert specs["layers"]["q_bias"].spec == PartitionSpec(None, sharding.MODEL)
    folder = checkpoint.save_hf_folder(tmp_path / "folder", params, cfg, tokenizer=qwen_tokenizer)
    cfg2, params2, reads = checkpoint.load_hf_folder_onto_mesh(folder, mesh)
    assert cfg2 == cfg and any(name.endswith("self_attn.v_proj.bias") for name, _ in reads.reads)
    _assert_same(params, params2)
