"""How far an edit moves a model's prediction at given prompts: the next-token distribution at each
prompt's last token, and the KL divergence between two models' distributions (e.g. unedited and
edited), a measure of change that does not depend on which targets are scored."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax import model as lmodel
from llama3_flax.sharding import mesh_of, rows_over_data

from jaxedit.editing.tokenize import check_lengths, encode_prompt, pad_id, pad_right


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_token_logprobs(params, cfg, tokens, mask, last):
    h, _ = lmodel.run_layers(params, cfg, lmodel.embed(params, tokens), mask)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]       # (B, D)
    return jax.nn.log_softmax(lmodel.logits_from_hidden(params, cfg, h_last), axis=-1)


def last_token_logprobs(params, cfg, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """(len(prompts), V) float32 log-probabilities of the next token after each prompt (BOS as the
    tokenizer adds it). Rows run batch_size at a time, padded right to a bucketed width."""
    if not prompts:
        raise ValueError("no prompts")
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    check_lengths([len(i) for i in ids], cfg, "drift prompt")
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        rows = chunk + [[pad_id(tokenizer)]] * (batch_size - len(chunk))  # one row count: one program
        tokens, mask = pad_right(rows, pad_id(tokenizer))
        last = np.asarray([len(r) - 1 for r in rows], np.int32)
        tokens, mask, last = rows_over_data(mesh_of(params), (tokens, mask, last))
        logp = _last_token_logprobs(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(last))
        out.append(np.asarray(logp[:len(chunk)], np.float32))
    return np.concatenate(out)


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per row of two (n, V) log-probability arrays, in
    float64 (nats; 0 for identical rows)."""
    logp, logq = np.asarray(logp, np.float64), np.asarray(logq, np.float64)
    if logp.shape != logq.shape or logp.ndim != 2:
        raise ValueError(f"two (n, V) log-probability arrays are needed, got shapes {logp.shape} and {logq.shape}")
    return np.maximum(np.sum(np.exp(logp) * (logp - logq), axis=1), 0.0)
