"""Independent references for the llama3_flax tests: transformers' PyTorch Llama on the same weights."""
from __future__ import annotations

import numpy as np

from llama3_flax import checkpoint


def rel_err(got, want, where=None) -> float:
    """||got - want|| / ||want|| in float64, optionally over a boolean selection `where` (leading axes)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if where is not None:
        where = np.asarray(where, bool)
        got, want = got[where], want[where]
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def torch_model(cfg, params):
    """transformers' LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM (cfg.architecture) built
    from cfg.to_hf(), holding params (eager attention, float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = cfg.to_hf()
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    hf_cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    assert type(model).__name__ == hf["architectures"][0], type(model).__name__
    state = {k: torch.from_numpy(np.asarray(v, np.float32).copy())
             for k, v in checkpoint.hf_state_dict_from_params(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(missing) <= allowed_missing and not unexpected, (missing, unexpected)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model


def rope_position_ids(mask) -> np.ndarray:
    """The RoPE positions llama3_flax uses for a padding mask (0, 1, ... over real tokens)."""
    mask = np.asarray(mask)
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def torch_logits(model, tokens, mask=None, output_hidden_states=False):
    """Float32 logits (numpy) of a transformers model on (B, T) tokens with a padding mask."""
    import torch

    tokens = np.asarray(tokens)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(rope_position_ids(mask).astype(np.int64)),
                    output_hidden_states=output_hidden_states, use_cache=False)
    logits = out.logits.float().numpy()
    if output_hidden_states:
        return logits, [h.float().numpy() for h in out.hidden_states]
    return logits


def random_tokens(rng: np.random.Generator, batch: int, length: int, vocab: int, low: int = 3) -> np.ndarray:
    """Token ids avoiding the special ids 0-2 of the tiny configs."""
    return rng.integers(low, vocab, size=(batch, length)).astype(np.int32)


def padded_batch(rng: np.random.Generator, lengths, vocab: int, side: str, pad_id: int = 0):
    """(tokens, mask) (B, max(lengths)) with random real tokens padded on `side`."""
    width = max(lengths)
    tokens = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        real = random_tokens(rng, 1, n, vocab)[0]
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        tokens[b, sl], mask[b, sl] = real, 1
    return tokens, mask
