"""AlphaEdit's null spaces of C0, computed once per C0 in float64 and cached on disk.

The eigendecomposition of an F x F C0 is the expensive part (F^3: seconds for SmolLM2's F = 1536,
minutes for Llama-3-8B's 14336), and any threshold can be cut from it later, so the cache holds the
eigendecomposition itself. A cache file names the C0 it was made from by the sha256 of C0's float32
bytes (the C0 cache file's checksum, which carries C0's provenance: model, tokenizer, corpus, sample
count), and is never used for another C0; an unreadable or corrupt file is reported and recomputed.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxedit.cache import atomic_write_bytes
from jaxedit.editing import pm
from jaxedit.distributed import to_host

logger = logging.getLogger(__name__)

EIGEN_FORMAT = 1


def covariance_digest(C0) -> str:
    """sha256 of C0 as contiguous float32 bytes (what jaxedit.editing.covariance_cache checksums)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(C0, np.float32)).tobytes()).hexdigest()


def eigen_file(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / f"eigh_{digest[:24]}.npz"


def _read(path: Path, digest: str, f: int):
    try:
        with np.load(path, allow_pickle=False) as z:
            evals, evecs = np.array(z["eigenvalues"]), np.array(z["eigenvectors"])
            made_for, checksum, fmt = str(z["covariance_sha256"]), str(z["sha256"]), int(z["format"])
    except Exception as e:  # truncated, bit-flipped (zip CRC), missing members
        return None, f"unreadable ({type(e).__name__}: {e})"
    if fmt != EIGEN_FORMAT or made_for != digest:
        return None, "made for another C0"
    if hashlib.sha256(evecs.tobytes() + evals.tobytes()).hexdigest() != checksum:
        return None, "corrupt (sha256 checksum does not match)"
    if evals.shape != (f,) or evecs.shape != (f, f) or evecs.dtype != np.float64:
        return None, f"malformed (shapes {evals.shape}, {evecs.shape}, dtype {evecs.dtype})"
    return (evals, evecs), ""


def _write(path: Path, digest: str, evals: np.ndarray, evecs: np.ndarray) -> None:
    evals, evecs = np.ascontiguousarray(evals, np.float64), np.ascontiguousarray(evecs, np.float64)
    buf = io.BytesIO()
    np.savez(buf, eigenvalues=evals, eigenvectors=evecs, covariance_sha256=np.str_(digest),
             format=np.int64(EIGEN_FORMAT), sha256=np.str_(hashlib.sha256(evecs.tobytes() + evals.tobytes()).hexdigest()))
    atomic_write_bytes(path, buf.getvalue())


def preservation_null_spaces(covariances: Mapping[int, object], threshold: float, *,
                             cache_dir: str | Path | None = None) -> dict[int, pm.NullSpace]:
    """{layer: pm.NullSpace} of each C0 at `threshold` (AlphaEdit's nullspace_threshold), from the
    cached eigendecomposition when cache_dir holds one for exactly this C0."""
    out = {}
    for layer, c in covariances.items():
        c = np.asarray(c, np.float32)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"C0 of layer {layer} must be a square (F, F) matrix, got shape {c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError(f"C0 of layer {layer} contains NaN or inf")
        eigen, digest = None, covariance_digest(c)
        path = eigen_file(Path(cache_dir).expanduser(), digest) if cache_dir is not None else None
        if path is not None and path.exists():
            eigen, why = _read(path, digest, c.shape[0])
            if eigen is None:
                logger.warning("ignoring the cached eigendecomposition %s: %s; recomputing", path, why)
        if eigen is None:
            eigen = tuple(to_host(x) for x in pm.eigen_preservation(c))
            if path is not None:
                _write(path, digest, *eigen)
        out[layer] = pm.null_space(c, threshold, eigen=eigen)
    return out
