"""Teacher-forced token predictions: EasyEdit's accuracy metric (rewrite_acc, rephrase_acc, locality).

For a (prompt, target) pair the model reads the prompt and the target's tokens, and at each target
position its most likely next token (the argmax of the logits at the position before) is compared
with the target's token. EasyEdit's rewrite and rephrase accuracies are the share of target tokens
predicted so; its locality compares the predicted tokens themselves before and after an edit.
CounterFact's metrics (jaxedit.eval.metrics) instead compare the probabilities of two targets.

Pairs are tokenised as jaxedit.eval.scoring tokenises them (prompt with BOS, target with a leading
space and no BOS). EasyEdit tokenises prompt + " " + target as one text; with byte-level BPE
tokenizers the ids agree, as a word after a space never merges with the text before it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax import model as lm_model
from llama3_flax.config import LlamaConfig
from llama3_flax.sharding import mesh_of, rows_over_data

from jaxedit.distributed import to_host
from jaxedit.editing import tokenize
from jaxedit.eval.scoring import encode_pairs


@functools.partial(jax.jit, static_argnames=("cfg",))
def _argmax_tokens(params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.argmax(lm_model.forward(params, cfg, tokens, mask), axis=-1).astype(jnp.int32)


def predicted_target_tokens(params, cfg: LlamaConfig, tokenizer, pairs: Sequence[tuple[str, str]],
                            batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (prompt, target) pair: (the model's argmax token at each target position, teacher-forced;
    the target's token ids), two int arrays of the target's length, in the order of `pairs`."""
    encoded = encode_pairs(tokenizer, pairs)
    seqs = []
    for k, e in enumerate(encoded):
        tokenize.check_token_ids(e.prompt_ids + e.target_ids, cfg, f"pair {k}")
        seqs.append(e.prompt_ids + e.target_ids[:-1])  # the last target token is predicted, never read
    tokenize.check_lengths([len(s) for s in seqs], cfg, "a prompt + target (less its last token)")
    mesh = mesh_of(params)  # on a mesh, rows go over its data axis
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape per row width: one compilation
        tokens, mask = tokenize.pad_right(rows, tokenize.pad_id(tokenizer), multiple=16)
        tokens, mask = rows_over_data(mesh, (tokens, mask))
        best = np.asarray(to_host(_argmax_tokens(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))))
        for j, e in enumerate(encoded[start:start + len(chunk)]):
            n = len(e.prompt_ids)
            out.append((best[j, n - 1:n - 1 + len(e.target_ids)].copy(), np.asarray(e.target_ids, np.int64)))
    return out


def token_accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    """Share of positions where the predicted token is the target's (EasyEdit's token accuracy)."""
    return float(np.mean(np.asarray(predicted) == np.asarray(target)))
