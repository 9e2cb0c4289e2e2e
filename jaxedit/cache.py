"""Small helpers for on-disk caches: model fingerprints and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive indices over all 32 bits


def _fmix32(h):
    """MurmurHash3's finaliser: a bijection of uint32 that mixes every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_uint32_words(leaf):
    """The bits of leaf as a flat uint32 array: 1- and 2-byte elements widened, 8-byte ones as two words."""
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32).reshape(-1)
    width = leaf.dtype.itemsize
    if width not in (1, 2, 4, 8):
        raise TypeError(f"model_fingerprint: cannot checksum a parameter of dtype {leaf.dtype}")
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(params):
    """Two uint32 checksums per leaf of the bits of all its elements (sums wrap modulo 2^32).

    first = sum of word[i] * (2i + 1): an odd multiplier is invertible modulo 2^32, so changing any one
    element changes it. second = sum of fmix32(word[i] ^ i * golden): a bijection of the word for each
    i (so it too sees every single change) but not linear, so changes of two or more elements that
    cancel in the first sum cancel in the second only by chance (about 2^-32).
    Modular sums do not depend on the order of reduction, so the result is the same on every backend.
    """
    def leaf_checksums(leaf):
        words = _as_uint32_words(leaf)
        index = jax.lax.iota(jnp.uint32, words.size)
        first = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
        second = jnp.sum(_fmix32(words ^ (index * jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
        return jnp.stack([first, second])

    return jax.tree_util.tree_map(leaf_checksums, params)


# Fingerprints of trees of immutable jax.Arrays, by the identity of their leaves (checked through weak
# references, so a freed and reused id is never mistaken). An editor asked to check values against the
# model it edits then pays for the fingerprint once per model, not once per edit.
_KNOWN: dict[tuple, tuple[list, str]] = {}
_KNOWN_MAX = 32


def model_fingerprint(params, cfg) -> str:
    """A hash of cfg and of every bit of every parameter: 20 hex characters.

    Any change of any element changes the fingerprint, also one that leaves the number equal (0.0 to
    -0.0) or moves it by one ulp, so one model's cached C0, templates or values are never served to
    another. Each leaf is reduced on its device to two uint32 checksums of its elements' bits (see
    _checksums); only those, with each leaf's path, shape and dtype and repr(cfg), are hashed with
    sha256 on the host.

    Cost: one read of the weights. On a GPU that is memory-bandwidth bound: Llama-3-8B in bfloat16
    (16 GB) at ~3 TB/s is about 5 ms. XLA's CPU backend reduces integers at about 1 GB/s: 0.56 s for
    SmolLM2-135M (540 MB float32, 135M elements) on 2 cores, so about 30-45 s for Llama-3-8B
    (8B elements) on such a CPU.
    A leaf of 2^32 words or more still has every single change seen (odd multipliers), though its
    indices wrap.
    """
    leaves = jax.tree_util.tree_leaves(params)
    key = (repr(cfg), jax.tree_util.tree_structure(params), tuple(id(x) for x in leaves))
    known = _KNOWN.get(key)
    if known is not None and all(ref() is leaf for ref, leaf in zip(known[0], leaves)):
        return known[1]
    fingerprint = _fingerprint(params, cfg)
    if all(isinstance(x, jax.Array) for x in leaves):  # immutable: the same objects keep the same bits
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.pop(next(iter(_KNOWN)))
        _KNOWN[key] = ([weakref.ref(x) for x in leaves], fingerprint)
    return fingerprint


def _fingerprint(params, cfg) -> str:
    digest = hashlib.sha256(repr(cfg).encode())
    sums = jax.device_get(_checksums(params))
    for (path, leaf), (_, pair) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree_util.tree_flatten_with_path(sums)[0]):
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        digest.update(np.asarray(pair, np.uint32).tobytes())
    return digest.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary size, special ids and the ids of a probe text."""
    probe = tokenizer("The quick brown fox, 1995 — Zürich; déjà vu.")["input_ids"]
    info = [len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, list(probe)]
    return hashlib.sha256(json.dumps(info).encode()).hexdigest()[:16]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a file so that a crash leaves either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())
