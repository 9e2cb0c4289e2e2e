"""Greedy and top-k sampling with a KV cache, jit-compiled (prefill once, then one token per step)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import LlamaConfig
from .model import Params, embed, empty_kv_cache, logits_from_hidden, run_layers_cached


def _pick(logits, rng, top_k: int, temperature: float):
    if top_k <= 1:
        return jnp.argmax(logits, axis=-1)
    vals, idx = jax.lax.top_k(logits / temperature, top_k)
    choice = jax.random.categorical(rng, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def generate(params: Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array, rng: jax.Array,
             max_new_tokens: int, top_k: int = 1, temperature: float = 1.0) -> jax.Array:
    """Continues left-padded prompts.

    Args:
      tokens, mask: (B, T) prompts, LEFT-padded (mask 0 on the left), so every prompt ends at slot T-1.
      top_k: 1 for greedy decoding, k > 1 for top-k sampling with `temperature` and `rng`.
    Returns:
      (B, max_new_tokens) new token ids.
    """
    b, t = tokens.shape
    caches = empty_kv_cache(cfg, b, t + max_new_tokens)
    key_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)
    prompt_len = jnp.sum(mask, axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # the RoPE position of every cache slot: the prompt's, then one more per generated token
    key_positions = jnp.concatenate([positions, prompt_len[:, None] + jnp.arange(max_new_tokens)], axis=1)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    h, caches = run_layers_cached(params, cfg, embed(params, tokens), positions, slots, key_mask, caches,
                                  key_positions=key_positions)
    logits = logits_from_hidden(params, cfg, h[:, -1])

    def step(carry, i):
        logits, caches, key_mask, rng = carry
        rng, sub = jax.random.split(rng)
        nxt = _pick(logits, sub, top_k, temperature)
        key_mask = key_mask.at[:, t + i].set(1)
        h, caches = run_layers_cached(params, cfg, embed(params, nxt[:, None]), (prompt_len + i)[:, None],
                                      jnp.full((b, 1), t + i), key_mask, caches, key_positions=key_positions)
        logits = logits_from_hidden(params, cfg, h[:, -1])
        return (logits, caches, key_mask, rng), nxt

    _, new = jax.lax.scan(step, (logits, caches, key_mask, rng), jnp.arange(max_new_tokens))
    return new.T


def generate_text(params: Params, cfg: LlamaConfig, tokenizer, prompts: list[str], max_new_tokens: int = 20,
                  top_k: int = 1, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Decoded continuations of text prompts (tokenised with the tokenizer's own BOS convention)."""
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id or 0
    tokens = jnp.array([[pad] * (width - len(e)) + e for e in enc], jnp.int32)
    mask = jnp.array([[0] * (width - len(e)) + [1] * len(e) for e in enc], jnp.int32)
    out = generate(params, cfg, tokens, mask, jax.random.PRNGKey(seed), max_new_tokens, top_k, temperature)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in jax.device_get(out)]
