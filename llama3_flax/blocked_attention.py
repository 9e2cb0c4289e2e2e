"""Causal self-attention in query blocks, for long rows run without a cache (corpus statistics).

A block of queries can only see keys up to its own last slot, so it scores just those: with blocks of
b slots over T, about (T + b) / 2T of the full T x T score matrix is computed, and the masked
exponentials of the rest are never formed. Heads are laid out key/value-head major, so that every
block is one batched matmul per key/value head of all its grouped query heads (large matrices instead
of many small ones, which CPUs run several times faster).
"""
from __future__ import annotations

import math as _math

import jax
import jax.numpy as jnp


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int) -> jax.Array:
    """Grouped-query self-attention, equal to math.grouped_query_attention for a causal bias.

    Args:
      q: (B, T, H, E) queries; k, v: (B, T, K, E) keys and values of the same slots.
      bias: (B, 1, T, T) additive bias that hides every later slot from a query (causal by slot,
        e.g. math.attention_bias with the slots as positions; padding and packed-segment masks on top).
      block: query slots per block (static).
    Returns:
      (B, T, H, E).
    """
    b, t, h, e = q.shape
    kv = k.shape[2]
    g = h // kv
    qt = q.reshape(b, t, kv, g, e).transpose(0, 2, 1, 3, 4)  # (B, K, T, G, E)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, E)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        n = end - start
        qs = qt[:, :, start:end].reshape(b, kv, n * g, e)
        scores = jnp.einsum("bkqe,bkse->bkqs", qs, kt[:, :, :end]).astype(jnp.float32) / _math.sqrt(e)
        scores = scores.reshape(b, kv, n, g, end) + bias[:, :, start:end, None, :end]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, n * g, end)
        outs.append(jnp.einsum("bkqs,bkse->bkqe", probs, vt[:, :, :end]).reshape(b, kv, n, g, e))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)
