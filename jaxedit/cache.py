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
    """A short hash of a model's config and of samples of every parameter tensor.

    Edited parameters (a changed down_proj) or another checkpoint give another fingerprint, so caches
    keyed by it are never reused for the wrong model.
    """
    h = hashlib.sha256(repr(cfg).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf), np.float32).reshape(-1)
        step = max(1, arr.size // 4096)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(arr[::step]).tobytes())
        h.update(np.float64(arr.astype(np.float64).sum()).tobytes())
    return h.hexdigest()[:16]


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
