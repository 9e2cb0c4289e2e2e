"""C0 on disk: one .npz per layer with its provenance (model and tokenizer fingerprints, corpus
identity, sample count and length) and a sha256 checksum of the matrix. A file that is unreadable,
corrupt or made for another setting is reported and never used."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from jaxedit.cache import atomic_write_bytes

CACHE_FORMAT = 1


def cache_file(cache_dir: Path, key: dict, corpus_tag: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9.-]+", "-", corpus_tag)[:40].strip("-")
    short = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / (f"cov_{key['model']}_L{key['layer']:03d}_{tag}_n{key['n_samples']}"
                        f"_len{key['max_length']}_{key['dtype']}_{short}.npz")


def write_cache(path: Path, matrix: np.ndarray, count: int, provenance: dict) -> None:
    """Atomically writes an .npz with the matrix, its token count, provenance JSON and sha256."""
    matrix = np.ascontiguousarray(matrix, np.float32)
    buf = io.BytesIO()
    np.savez(buf, matrix=matrix, count=np.int64(count), provenance=np.str_(json.dumps(provenance, sort_keys=True)),
             sha256=np.str_(hashlib.sha256(matrix.tobytes()).hexdigest()))
    atomic_write_bytes(path, buf.getvalue())


def read_cache(path: Path, key: dict, f: int) -> tuple[np.ndarray | None, str]:
    """(matrix, "") from a valid cache file, else (None, why it cannot be used)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            matrix = np.array(z["matrix"])
            provenance = json.loads(str(z["provenance"]))
            digest = str(z["sha256"])
            int(z["count"])
    except Exception as e:  # truncated, bit-flipped (zip CRC), missing members, bad JSON
        return None, f"unreadable ({type(e).__name__}: {e})"
    if hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest() != digest:
        return None, "corrupt (sha256 checksum of the matrix does not match)"
    wrong = sorted(k for k in key if provenance.get(k) != key[k])
    if wrong:
        return None, "for another setting (provenance differs in " + ", ".join(
            f"{k}: {provenance.get(k)!r} != {key[k]!r}" for k in wrong) + ")"
    if matrix.shape != (f, f) or matrix.dtype != np.float32 or not np.all(np.isfinite(matrix)):
        return None, f"malformed (shape {matrix.shape}, dtype {matrix.dtype}, or non-finite values)"
    return matrix, ""
