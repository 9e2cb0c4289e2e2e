"""Negative log-likelihoods of target tokens: the pure maths every scorer shares."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """-log softmax(logits)[ids]: logits (..., V), ids (...) int -> (...) float32.

    Computed as logsumexp - the target's logit, so the (..., V) log-probabilities are never written.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def mean_target_nll(logits: jax.Array, ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean NLL over the valid target slots of each row.

    Args:
      logits: (B, P, V) logits predicting each target slot (i.e. taken at the position before it).
      ids: (B, P) target token ids.
      valid: (B, P) 1/True for real target tokens, 0 for padding slots.
    Returns:
      (B,) float32 mean NLL per row (0 for rows without any valid slot).
    """
    valid = valid.astype(jnp.float32)
    nll = token_nll(logits, ids) * valid
    return jnp.sum(nll, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1.0)


def sequence_target_nll(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Mean target NLL from full-sequence logits (the plain definition; used as a reference).

    Args:
      logits: (B, T, V) logits of every position.
      tokens: (B, T) token ids.
      target_mask: (B, T) 1 at the target tokens (never at position 0).
    Returns:
      (B,) mean over target tokens t of -log softmax(logits[t-1])[tokens[t]].
    """
    return mean_target_nll(logits[:, :-1], tokens[:, 1:], target_mask[:, 1:])
