"""Small helpers for on-disk caches: model fingerprints and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np


def model_fingerprint(params, cfg) -> str:
    """A hash of cfg and of a grid of values of every parameter tensor (all stacked layers).

    Low-rank edits change every entry of a matrix, so an edited model (or another checkpoint) gets
    another fingerprint. Only ~256 values per layer and tensor leave the device.
    """
    digest = hashlib.sha256(repr(cfg).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(leaf.shape)
        stacked = "layers" in jax.tree_util.keystr(path) and len(shape) >= 2
        index = tuple(slice(None) if (stacked and axis == 0) else slice(None, None, max(1, n // 16))
                      for axis, n in enumerate(shape))
        sample = np.asarray(jax.device_get(leaf[index]), np.float32)
        digest.update(f"{jax.tree_util.keystr(path)}{shape}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
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
