"""The Llama maths as pure functions of arrays.

Axis vocabulary: B batch, T query positions, S key positions, D model width, F MLP width,
H query heads, K key/value heads, E head dim. Weights are stored as PyTorch does, (out, in),
so that an MLP down-projection W (D, F) maps a key k (F,) to W @ k as in the editing papers.
"""
from __future__ import annotations

import math as _math

import jax
import jax.numpy as jnp

from .config import LlamaConfig


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., in) with w (out, in) -> (..., out) in x's dtype.

    The weight's dtype is the multiply precision (x is rounded to it) and sums are float32, as
    GPU matmuls do; so bfloat16 weights under float32 activations give mixed-precision inference
    (model.matrices_as), and CPUs with bfloat16 dot instructions run it at their bfloat16 rate.
    """
    sums = jnp.promote_types(w.dtype, jnp.float32)  # float64 stays float64
    return jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, preferred_element_type=sums).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to x's dtype before the weight (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inverse_frequencies(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies (E/2,), with Llama-3.1 "llama3" scaling of the low frequencies if configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * _math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_angles(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, E) for integer positions (B, T), in the rotate-half layout of transformers."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (B, T, heads, E) by the angles (B, T, E)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_bias(query_positions: jax.Array, key_positions: jax.Array, key_mask: jax.Array,
                   key_ends: jax.Array | None = None, *, window: int | None = None,
                   query_rope_positions: jax.Array | None = None,
                   key_rope_positions: jax.Array | None = None) -> jax.Array:
    """Additive bias (B, 1, T, S): 0 where a query may see a key (causal and not padding), else -inf-ish.

    Positions are slot indices (not RoPE positions), so causality holds for left padding too.
    key_ends: (B, S) for rows that pack a tree of tokens in depth-first order (several sequences,
    or continuations sharing a prompt): the slot just after each key's subtree. A query sees a key
    only from inside that subtree, i.e. when the key is one of its ancestors (or itself).
    window: a sliding window (Mistral; cfg.sliding_window, None for none): a query sees only keys
    fewer than `window` RoPE positions before its own, given query_rope_positions (B, T) and
    key_rope_positions (B, S). Counted in RoPE positions, not slots, so that a token of a packed tree
    or one attending to a prefix cache keeps the window it has in its own unpadded sequence.
    """
    allowed = (key_positions[:, None, :] <= query_positions[:, :, None]) & key_mask[:, None, :].astype(bool)
    if key_ends is not None:
        allowed &= query_positions[:, :, None] < key_ends[:, None, :]
    if window is not None:
        if query_rope_positions is None or key_rope_positions is None:
            raise ValueError("a sliding-window attention bias needs the RoPE positions of the queries and keys")
        allowed &= (query_rope_positions[:, :, None] - key_rope_positions[:, None, :]) < window
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, :, :]


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """q (B, T, H, E), k and v (B, S, K, E), bias (B, 1, T, S) -> (B, T, H, E).

    Heads are grouped so each of the K key/value heads serves H/K query heads, without repeating k, v.
    Softmax in float32.
    """
    return attention_over_blocks(q, ((k, v, bias),))


def attention_over_blocks(q: jax.Array, blocks) -> jax.Array:
    """Grouped-query attention over several blocks of keys, with one softmax across all of them.

    blocks: ((k, v, bias), ...) with k, v (B, S_i, K, E) and bias (B, 1, T, S_i). Keeping a read-only
    prefix cache in its own block means it is never copied, and never differentiated.
    """
    b, t, h, e = q.shape
    kv = blocks[0][0].shape[2]
    qg = q.reshape(b, t, kv, h // kv, e)
    scores = [jnp.einsum("btkge,bske->bkgts", qg, k).astype(jnp.float32) / _math.sqrt(e)
              + bias[:, :, None]  # (B, 1, 1, T, S) broadcast over K and groups
              for k, _, bias in blocks]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0, 0
    for k, v, _ in blocks:
        p = probs[..., start:start + k.shape[1]].astype(v.dtype)
        out = out + jnp.einsum("bkgts,bske->btkge", p, v)
        start += k.shape[1]
    return out.reshape(b, t, h, e)


def swiglu_mlp_input(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The down-projection's input silu(x W_gate^T) * (x W_up^T), (..., F): the key of the editors."""
    return jax.nn.silu(linear(x, gate)) * linear(x, up)
