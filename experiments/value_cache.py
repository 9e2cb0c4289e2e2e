"""Target values kept on disk, so sweeps that edit the same unedited model reuse them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np


_VALUE_FIELDS = ("target", "init", "delta", "loss", "nll", "steps")


def _code_mtime() -> float:
    """The newest modification time of the modules that compute values: cached values written before
    it are stale (the library changed) and are recomputed."""
    from jaxedit.editing import keys, values

    return max(Path(m.__file__).stat().st_mtime for m in (values, keys))


def _folder_key(model: str, tokenizer: str, hp, groups) -> str:
    """What every value in one folder shares: model, tokenizer, layer, site, value hparams, templates."""
    desc = json.dumps({"model": model, "tokenizer": tokenizer, "layer": hp.layers[-1], "site": hp.spec.site,
                       "value": dataclasses.asdict(hp.value), "templates": [list(g) for g in groups]},
                      sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _stored_row(path: Path, width: int) -> tuple[dict | None, str]:
    """(the stored fields of one request's value, "") or (None, what is wrong with the file): a torn
    file, a missing field, or a value of another width than the model's (made by another model)."""
    try:
        with np.load(path) as z:
            missing = [f for f in _VALUE_FIELDS if f not in z.files]
            if missing:
                return None, f"without the field(s) {missing}"
            row = {f: np.array(z[f]) for f in _VALUE_FIELDS}
    except Exception as e:  # noqa: BLE001  (a torn or foreign file: numpy and zipfile raise many kinds)
        return None, f"unreadable ({type(e).__name__})"
    for f in _VALUE_FIELDS:
        want = (width,) if f in ("target", "init", "delta") else ()
        if row[f].shape != want:
            return None, f"of shape {row[f].shape} for {f!r} where the model needs {want}"
    return row, ""


def request_file_name(request) -> str:
    """The file of a request's value: the digest of the request fields the value depends on (prompt,
    subject, target_new; values.request_digest), never its case_id, so another request under the same id is not served this
    value, and ids that differ only in characters unfit for file names do not share a file."""
    from jaxedit.editing.values import request_digest

    return request_digest(request) + ".npz"


class ValueCache:
    """Target values of single requests on one (unedited) model, on disk in one folder per (model
    fingerprint, tokenizer fingerprint, layer, site, value hparams, templates) and one file per request
    content (request_file_name). A value depends only on its own request (the batched optimisation is
    independent per request), so values computed in any batch can be reused by any later edit of the
    same request on the same model: the layer sweep, the batch sweep and the first batch of a
    sequential run share them."""

    def __init__(self, params, cfg, tok, cache_dir: str | os.PathLike | None, enabled: bool = True):
        from jaxedit.cache import model_fingerprint, tokenizer_fingerprint

        self.params, self.cfg, self.tok = params, cfg, tok
        self.dir = Path(cache_dir) / "values" if (cache_dir is not None and enabled) else None
        self.fingerprint = model_fingerprint(params, cfg) if self.dir is not None else None
        self.tokenizer_fingerprint = tokenizer_fingerprint(tok) if self.dir is not None else None

    def get(self, requests, hp, groups, chunk_size: int = 64):
        """Values (batch of len(requests)) for requests on the cache's model, computing missing ones
        batched, chunk_size requests at a time, and storing each chunk once it is computed."""
        import jax
        import jax.numpy as jnp
        from jaxedit.distributed import is_writer, to_host
        from jaxedit.editing import editor
        from jaxedit.editing.values import Values, ValuesFor, request_digest
        from jaxedit.progress import progress_bar

        requests = tuple(requests)
        if self.dir is None:
            return editor.edit_values(self.params, self.cfg, self.tok, requests, hp, templates=groups,
                                      chunk_size=chunk_size)
        folder = self.dir / _folder_key(self.fingerprint, self.tokenizer_fingerprint, hp, groups)
        have: dict[str, dict] = {}  # by file name
        fresh_after = _code_mtime()
        for r in requests:
            name = request_file_name(r)
            p = folder / name
            if name not in have and p.is_file() and p.stat().st_mtime >= fresh_after:
                row, why = _stored_row(p, self.cfg.hidden_size)
                if row is None:
                    logging.warning("value cache entry %s is %s; recomputing it", p, why)
                else:
                    have[name] = row
        missing, missing_names = [], set()
        for r in requests:  # each content once, however many case ids ask for it
            name = request_file_name(r)
            if name not in have and name not in missing_names:
                missing.append(r)
                missing_names.add(name)
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            # Chunk by chunk (the chunks compute_values would make), each stored as soon as it is done:
            # a run stopped inside a thousand-request cell keeps what it has computed.
            chunks = [missing[i:i + chunk_size] for i in range(0, len(missing), chunk_size)]
            for chunk in progress_bar(chunks, None, f"values ({len(missing)} requests)", threshold=1):
                vals = jax.tree_util.tree_map(to_host, editor.edit_values(self.params, self.cfg, self.tok, chunk, hp,
                                                                          templates=groups, chunk_size=chunk_size))
                for i, r in enumerate(chunk):
                    name = request_file_name(r)
                    row = {f: np.asarray(getattr(vals, f)[i]) for f in _VALUE_FIELDS}
                    have[name] = row
                    if not is_writer():  # one process of a jax.distributed run writes the shared cache
                        continue
                    tmp = folder / f".{name}.{uuid.uuid4().hex[:6]}.npz"
                    np.savez(tmp, **row)
                    os.replace(tmp, folder / name)
        rows = [have[request_file_name(r)] for r in requests]
        made_for = ValuesFor(model=self.fingerprint, layer=int(hp.layers[-1]), site=hp.spec.site,
                             requests=tuple(request_digest(r) for r in requests))
        return Values(**{f: jnp.asarray(np.stack([row[f] for row in rows])) for f in _VALUE_FIELDS},
                      made_for=made_for)


def slice_values(values, i: int, j: int | None = None):
    """The values of requests i..j-1 (default: request i alone), with what they were made for."""
    return values.select(slice(i, i + 1 if j is None else j))
