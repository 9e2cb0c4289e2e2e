"""A sequential run's state after each batch, on disk, so that a run killed after hours resumes at
its last finished batch.

Only what the run changed is kept: the edited layers' down_proj, the keys carried between batches
(earlier edits' keys, AlphaEdit's K_p), how many batches are done, what `after_batch` returned for
each (JSON), and whether the run was stopped. One .npz file, written atomically after every batch,
named by an identity of everything the run depends on (the unedited model's fingerprint, the
requests, the hparams, the batch size), so a checkpoint is never resumed by another run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxedit.cache import atomic_write_bytes, model_fingerprint
from jaxedit.editing.values import request_digest

FORMAT = 1


class CheckpointError(ValueError):
    """A run checkpoint that cannot be resumed: corrupt, or made by another run."""


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a run stands: `done` batches finished, the edited layers' down_proj after them, the keys
    each layer carries (F, n) (n = 0 when none), the batches' after_batch results, and a stop reason."""

    done: int
    down_proj: dict[int, np.ndarray]
    carried_keys: dict[int, np.ndarray]
    extras: tuple
    stopped: str | None = None


def run_identity(params, cfg, requests: Sequence, hparams, batch_size: int, preserve_previous_edits: bool) -> str:
    """A hash of everything a sequential run's result depends on."""
    text = json.dumps([FORMAT, model_fingerprint(params, cfg), [request_digest(r) for r in requests],
                       repr(hparams), int(batch_size), bool(preserve_previous_edits)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def state_path(directory: str | os.PathLike, identity: str) -> Path:
    return Path(directory) / f"run-{identity}.npz"


def save_state(directory: str | os.PathLike, identity: str, state: RunState) -> Path:
    """Writes the state atomically (a crash leaves the previous state or this one, never a mix)."""
    try:
        extras = json.dumps(list(state.extras))
    except TypeError as e:
        raise TypeError(f"a checkpointed run keeps what after_batch returns as JSON: {e}") from None
    arrays = {"meta": np.asarray(json.dumps({"format": FORMAT, "identity": identity, "done": state.done,
                                             "stopped": state.stopped, "layers": sorted(state.down_proj)}))}
    arrays["extras"] = np.asarray(extras)
    for layer, w in state.down_proj.items():
        arrays[f"down_proj_{layer}"] = np.asarray(w)
    for layer, k in state.carried_keys.items():
        arrays[f"keys_{layer}"] = np.asarray(k)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = state_path(directory, identity)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_state(directory: str | os.PathLike, identity: str) -> RunState | None:
    """The saved state of this run, or None if it has none. Raises CheckpointError if it is unreadable."""
    path = state_path(directory, identity)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            extras = tuple(json.loads(str(data["extras"])))
            layers = [int(l) for l in meta["layers"]]
            down = {l: np.asarray(data[f"down_proj_{l}"]) for l in layers}
            keys = {l: np.asarray(data[f"keys_{l}"]) for l in layers if f"keys_{l}" in data}
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(f"run checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {e}); "
                              "delete it to start the run again") from None
    if meta.get("format") != FORMAT or meta.get("identity") != identity or len(extras) != meta.get("done"):
        raise CheckpointError(f"run checkpoint {str(path)!r} does not belong to this run (format, identity or "
                              "batch count differ); delete it to start the run again")
    return RunState(done=int(meta["done"]), down_proj=down, carried_keys=keys, extras=extras,
                    stopped=meta.get("stopped"))
