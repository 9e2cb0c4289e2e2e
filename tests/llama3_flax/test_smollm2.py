"""SmolLM2-135M-Instruct from the offline GGUF file against transformers' own load of the same file."""
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import checkpoint, config, model
from llama3_flax.generate import generate_text

from .reference import rel_err, torch_logits

PROMPTS = ["The capital of France is", "Hello, my name is",
           "def fibonacci(n):\n    return", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def hf_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    path = checkpoint.smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def test_config_is_smollm2_135m(smollm2):
    cfg, params, _ = smollm2
    preset = config.smollm2_135m()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert "lm_head" not in params
    assert 134e6 < model.num_params(params) < 135e6


def test_weights_match_transformers_dequantisation(smollm2, hf_smollm2):
    """Same tensors as transformers' GGUF conversion, including the q/k rotary un-permutation."""
    cfg, params, _ = smollm2
    state = hf_smollm2.state_dict()
    ours = checkpoint.hf_state_dict_from_params(params, cfg)
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.layers.13.self_attn.v_proj.weight"]:
        np.testing.assert_allclose(ours[name], state[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_logits_match_transformers(smollm2, hf_smollm2):
    cfg, params, tok = smollm2
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    tokens, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any(), "want a padded batch"
    got = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    want = torch_logits(hf_smollm2, tokens, mask)
    assert rel_err(got, want, mask) <= 1e-4
    # Same next-token predictions at every real position.
    real = mask.astype(bool)
    agree = (np.argmax(np.asarray(got), -1) == np.argmax(want, -1))[real]
    assert agree.mean() >= 0.99


def test_left_padded_logits_match_transformers(smollm2, hf_smollm2):
    cfg, params, tok = smollm2
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, enc))
    tokens = np.array([[cfg.pad_token_id] * (width - len(e)) + e for e in enc], np.int32)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in enc], np.int32)
    got = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    assert rel_err(got, torch_logits(hf_smollm2, tokens, mask), mask) <= 1e-4


def test_greedy_continuation_knows_paris(smollm2):
    cfg, params, tok = smollm2
    out = generate_text(params, cfg, tok, ["The capital of France is", "Hello, my name is"], max_new_tokens=8)
    assert len(out) == 2
    assert "Paris" in out[0], out
