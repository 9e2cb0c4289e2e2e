"""save_gguf: SmolLM2 and tiny random models written as GGUF and read back by load_gguf and transformers."""
import math
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import checkpoint, config, gguf_export, model

from .reference import rel_err, torch_logits

PROMPTS = ["The capital of France is", "Hello, my name is",
           "def fibonacci(n):\n    return", "Water boils at a temperature of"]

# Relative logit error (||ours - reloaded|| / ||ours|| over real positions) allowed per dtype; the
# values measured on PROMPTS were 0 (float32), 6.8e-4 (float16), 3.1e-3 (bfloat16), 1.7e-2 (q8_0).
BOUNDS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2, "q8_0": 3.5e-2}


def _batch(tok):
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def _tokenizer_fields(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def source_tokenizer():
    """The source file's tokenizer fields, read once (parsing 49152 tokens takes seconds)."""
    return gguf_export.tokenizer_from_gguf(checkpoint.smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_logits(smollm2):
    """(tokens, mask, logits) of the loaded SmolLM2 on PROMPTS."""
    cfg, params, tok = smollm2
    tokens, mask = _batch(tok)
    return tokens, mask, model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory):
    """SmolLM2 exported as float32 GGUF with the tokenizer copied from the source file."""
    cfg, params, _ = smollm2
    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    return gguf_export.save_gguf(path, params, cfg, tokenizer_source=checkpoint.smollm2_gguf_path())


def test_permute_rope_inverts_load_gguf_unpermute():
    w = np.random.default_rng(0).normal(size=(3 * 64, 10)).astype(np.float32)
    for heads in (1, 3):
        back = checkpoint._unpermute_rope(gguf_export.permute_rope(w, heads), heads)
        np.testing.assert_array_equal(back, w)
    assert not np.array_equal(gguf_export.permute_rope(w, 3), w)  # it does move rows


def test_float32_round_trip_is_exact(smollm2, smollm2_logits, smollm2_f32):
    cfg, params, _ = smollm2
    cfg2, params2 = checkpoint.load_gguf(smollm2_f32)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, mask, ours = smollm2_logits
    back = model.forward(params2, cfg2, jnp.asarray(tokens), jnp.asarray(mask))
    assert rel_err(back, ours, mask) <= BOUNDS["float32"]


def test_tokenizer_and_chat_template_carried_over(source_tokenizer, smollm2_f32):
    want = source_tokenizer.as_dict()
    got = _tokenizer_fields(smollm2_f32)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
    assert "<|im_start|>" in got["tokenizer.chat_template"]


def test_transformers_loads_float32_export(smollm2_logits, smollm2_f32):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_f32.parent), gguf_file=smollm2_f32.name,
                                              dtype=torch.float32).eval()
    tokens, mask, ours = smollm2_logits
    theirs = torch_logits(hf, tokens, mask)
    print(f"float32 export via transformers: relative logit error {rel_err(ours, theirs, mask):.3g}")
    # measured 1.9e-6; the same bound as for transformers' load of the source file (test_smollm2)
    assert rel_err(ours, theirs, mask) <= 1e-4
    real = mask.astype(bool)
    assert (np.argmax(np.asarray(ours), -1) == np.argmax(theirs, -1))[real].mean() >= 0.99


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "q8_0"])
def test_reduced_precision_logits_within_bounds(smollm2, smollm2_logits, source_tokenizer, tmp_path, dtype):
    cfg, params, _ = smollm2
    path = gguf_export.save_gguf(tmp_path / f"m-{dtype}.gguf", params, cfg, tokenizer_source=source_tokenizer,
                                 dtype=dtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want = {"float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.3.ffn_down.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.3.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"

    cfg2, params2 = checkpoint.load_gguf(path)
    assert cfg2 == cfg
    tokens, mask, ours = smollm2_logits
    back = model.forward(params2, cfg2, jnp.asarray(tokens), jnp.asarray(mask))
    err = rel_err(back, ours, mask)
    print(f"{dtype}: relative logit error {err:.3g}")
    assert 0 < err <= BOUNDS[dtype], err  # > 0: the weights really were rounded
    real = mask.astype(bool)
    assert (np.argmax(np.asarray(ours), -1) == np.argmax(np.asarray(back), -1))[real].mean() >= 0.9


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_round_trips_with_hf_tokenizer(smollm2, source_tokenizer, tmp_path, tied):
    _, _, tok = smollm2
    cfg = config.tiny(vocab_size=len(tok), tie_word_embeddings=tied)
    params = model.init_params(cfg, jax.random.PRNGKey(1))
    path = gguf_export.save_gguf(tmp_path / "tiny.gguf", params, cfg, tokenizer_source=tok)
    cfg2, params2 = checkpoint.load_gguf(path)
    assert cfg2.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # stored as float32
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
    assert ("lm_head" in params2) is (not tied)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(_batch(tok)[0])
    np.testing.assert_array_equal(model.forward(params2, cfg2, tokens), model.forward(params, cfg, tokens))

    # The vocabulary built from the HF tokenizer is the one llama.cpp's converter wrote for SmolLM2.
    got, want = _tokenizer_fields(path), source_tokenizer.as_dict()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert got[key] == want[key], key
    assert got["tokenizer.ggml.padding_token_id"] == cfg.pad_token_id  # the model's own, not the tokenizer's


def test_tokenizer_padded_to_vocab_size(smollm2, tmp_path):
    _, _, tok = smollm2
    cfg = config.tiny(vocab_size=len(tok) + 64)  # models often round the embedding up
    params = model.init_params(cfg, jax.random.PRNGKey(2))
    fields = _tokenizer_fields(gguf_export.save_gguf(tmp_path / "padded.gguf", params, cfg, tokenizer_source=tok))
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.tokens"][len(tok)] == f"[PAD{len(tok)}]"
    assert set(fields["tokenizer.ggml.token_type"][len(tok):]) == {5}  # unused


def test_llama3_rope_scaling_written_as_llama_cpp_freq_factors(tmp_path):
    scaling = config.RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)
    cfg = config.tiny(rope_scaling=scaling, vocab_size=128)
    params = model.init_params(cfg, jax.random.PRNGKey(3))
    meta = gguf_export.TokenizerMetadata((
        ("tokenizer.ggml.model", "gpt2", gguf.GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", [f"t{i}" for i in range(128)], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    ))
    path = gguf_export.save_gguf(tmp_path / "scaled.gguf", params, cfg, tokenizer_source=meta)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, written out here
    want = []
    old, low, high = 64, 1.0, 4.0
    for i in range(0, cfg.head_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
        if wavelen < old / high:
            want.append(1.0)
        elif wavelen > old / low:
            want.append(32.0)
        else:
            smooth = (old / wavelen - low) / (high - low)
            want.append(1 / ((1 - smooth) / 32.0 + smooth))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(set(np.round(got, 3))) >= 3  # all three regimes present in this config


def test_crash_leaves_no_partial_file(smollm2, tmp_path, monkeypatch):
    _, _, tok = smollm2
    cfg = config.tiny(vocab_size=len(tok))
    params = model.init_params(cfg, jax.random.PRNGKey(4))
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")

    def boom(self, **_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        gguf_export.save_gguf(target, params, cfg, tokenizer_source=tok)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_clear_errors(smollm2, source_tokenizer, tmp_path):
    _, _, tok = smollm2
    cfg = config.tiny(vocab_size=128)
    params = model.init_params(cfg, jax.random.PRNGKey(5))
    with pytest.raises(gguf_export.GGUFExportError, match="dtype must be one of"):
        gguf_export.save_gguf(tmp_path / "a.gguf", params, cfg, tokenizer_source=tok, dtype="q4_0")
    with pytest.raises(gguf_export.GGUFExportError, match="49152 tokens but the model's vocab_size is 128"):
        gguf_export.save_gguf(tmp_path / "a.gguf", params, cfg, tokenizer_source=source_tokenizer)
    with pytest.raises(gguf_export.GGUFExportError, match="vocab_size is 128"):
        gguf_export.save_gguf(tmp_path / "a.gguf", params, cfg, tokenizer_source=tok)
    with pytest.raises(gguf_export.GGUFExportError, match=r"params\['layers'\]\['q_proj'\] has shape"):
        bad = {**params, "layers": {**params["layers"], "q_proj": params["layers"]["q_proj"][:, :8]}}
        gguf_export.save_gguf(tmp_path / "a.gguf", bad, cfg, tokenizer_source=tok)
    with pytest.raises(gguf_export.GGUFExportError, match="must end in .gguf"):
        gguf_export.save_gguf(tmp_path / "a.bin", params, cfg, tokenizer_source=tok)
    assert list(tmp_path.iterdir()) == []
