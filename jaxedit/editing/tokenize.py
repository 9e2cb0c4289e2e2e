"""Turning text into padded token batches: prompts keep the tokenizer's BOS, targets never do."""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Defined with the loaders, so that llama3_flax.checkpoint.load_model can check without importing jaxedit.
from llama3_flax.checkpoint import check_tokenizer  # noqa: F401  (part of this module's API)
from jaxedit.packing import bucket


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's own special tokens (BOS if the model uses one)."""
    return list(tokenizer(text)["input_ids"])


def encode_target(tokenizer, target: str) -> list[int]:
    """Token ids of a target object as it follows a prompt: a leading space, no BOS or other specials.

    (One reference implementation stripped BOS only for Llama-2 names, misaligning Llama-3 scores.)
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target {target!r} is empty")
    ids = list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def check_lengths(lengths: Sequence[int], cfg, what: str) -> None:
    """Raises ValueError if the longest of `lengths` (token counts) exceeds cfg.max_position_embeddings.

    Past that length RoPE runs on positions the model never saw, and its outputs are garbage with no
    error of their own. `what` names the sequences in the message, e.g. "prompt of case 3".
    """
    if len(lengths) and max(lengths) > cfg.max_position_embeddings:
        raise ValueError(f"{what}: a sequence of {max(lengths)} tokens is longer than the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")


def check_token_ids(ids, cfg, what: str) -> None:
    """Raises ValueError if any token id is negative or >= cfg.vocab_size.

    JAX clamps out-of-range gather indices instead of failing, so such ids would silently read
    another token's embedding and logits.
    """
    ids = np.asarray(ids)
    if not ids.size:
        return
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise ValueError(f"{what}: token id {int(bad.flat[0])} is outside the model's vocabulary "
                         f"(vocab_size {cfg.vocab_size}); the tokenizer does not belong to this model")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
              multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to (B, W) int32 tokens and a (B, W) int32 mask.

    W is `width` if given, else the longest sequence rounded up to `multiple`.
    """
    longest = max(len(s) for s in seqs)
    width = bucket(longest, multiple) if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {longest} tokens does not fit width {width}")
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return tokens, mask


def pad_id(tokenizer) -> int:
    """The id used for padding (masked out, so any valid id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
