"""Scaling strategies over params: batch, sequential and sequential-batched editing."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxedit.editing import pm, preflight, run_state
from jaxedit.editing.editor import EditReport, edit, with_previous_keys
from jaxedit.editing.values import Values
from jaxedit.hparams import EditHparams
from jaxedit.requests import EditRequest, validate_batch


@dataclasses.dataclass(frozen=True)
class StopEditing:
    """What `after_batch` returns to end a run after this batch (e.g. a collapse guard that fired):
    the reason, and what to keep as the batch's result."""

    reason: str
    extra: Any = None


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """One applied batch: its index, its report (None for a batch restored from a checkpoint), what
    `after_batch` returned (e.g. metrics), and the reason the run stopped there, if it did."""

    index: int
    report: EditReport | None
    extra: Any = None
    stopped: str | None = None


def batch_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
               covariances, templates, **kwargs):
    """All requests in one update. Returns (new params, EditReport)."""
    return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates, **kwargs)


def sequential_batched_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
                            covariances, templates, batch_size: int, preserve_previous_edits: bool = False,
                            after_batch: Callable[[int, Any, tuple, EditReport], Any] | None = None,
                            first_values: Values | None = None, progress: bool = True,
                            checkpoint_dir: str | os.PathLike | None = None, **kwargs):
    """Batches of `batch_size` applied one after another, keys and values recomputed on the current
    (already edited) params each time.

    Args:
      preserve_previous_edits: add the keys written by earlier batches to the preservation term
        (C0 + K_prev K_prev^T / lambda), so later batches keep earlier edits in place. AlphaEdit
        always does (its update keeps the earlier keys K_p in place; the method says so:
        Method.keeps_previous_keys), with C0's null space computed once.
      after_batch: called as after_batch(index, params, batch, report) right after each batch (e.g. to
        measure metrics then); its return value is kept in BatchOutcome.extra. Returning
        StopEditing(reason, extra) ends the run after this batch.
      checkpoint_dir: keep the run's state there after every batch (run_state: the edited layers'
        down_proj, the carried keys, after_batch's results, which must then be JSON) and resume from
        it: a run killed mid-way and called again with the same arguments skips its finished batches
        (their outcomes come back with report None) and gives the same final params.
      first_values: the first batch's values, optimised on the unedited params (e.g. shared with
        another method's run from a value cache); the editor refuses them when they were made for
        other requests or another model. Later batches' values are optimised on the edited params.
    Returns:
      (final params, list of BatchOutcome).
    """
    requests = validate_batch(requests, one_batch=False)  # a later batch may overwrite an earlier fact
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    method = hparams.spec
    method.check_requests(batch_size)
    if method.keeps_previous_keys:
        if preserve_previous_edits:
            raise ValueError(f"{method.title} keeps earlier edits' keys by itself: preserve_previous_edits is for "
                             "MEMIT and EMMET")
        fixed, _ = preflight.null_spaces(covariances, hparams.layers, cfg.intermediate_size,
                                         hparams.nullspace_threshold)
    elif not preserve_previous_edits:  # factor C0 once per layer
        fixed = {l: c if isinstance(c, pm.Preservation) else
                 pm.factor_preservation(jnp.asarray(c), shift=hparams.preservation_shift)
                 for l, c in covariances.items()}
    else:  # earlier keys change the preservation matrix every batch
        fixed = None
        if any(isinstance(c, pm.Preservation) for c in covariances.values()):
            raise ValueError("preserve_previous_edits needs the covariance matrices C0, not their factors")
    previous: dict[int, list] = {l: [] for l in hparams.layers}
    outcomes = []
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    identity, start = None, 0
    if checkpoint_dir is not None:
        identity = run_state.run_identity(params, cfg, requests, hparams, batch_size, preserve_previous_edits)
        saved = run_state.load_state(checkpoint_dir, identity)
        if saved is not None:
            params, previous, outcomes = _resume(params, saved, hparams.layers)
            start = saved.done if saved.stopped is None else len(batches)
    for index in tqdm(range(start, len(batches)), desc=f"{hparams.method} batches of {batch_size}",
                      disable=not progress, initial=start, total=len(batches)):
        batch = batches[index]
        if fixed is not None:
            covs = fixed
        else:
            covs = {l: (with_previous_keys(covariances[l], jnp.concatenate(previous[l], axis=1),
                                           hparams.mom2_update_weight) if previous[l] else covariances[l])
                    for l in hparams.layers}
        carried = ({l: jnp.concatenate(previous[l], axis=1) for l in hparams.layers if previous[l]}
                   if method.keeps_previous_keys else None)
        params, report = edit(params, cfg, tokenizer, batch, hparams, covariances=covs, templates=templates,
                              previous_keys=carried, values=first_values if index == 0 else None, **kwargs)
        for layer, keys in zip(hparams.layers, report.keys):
            previous[layer].append(keys)
        extra = after_batch(index, params, batch, report) if after_batch is not None else None
        stopped = extra.reason if isinstance(extra, StopEditing) else None
        if stopped is not None:
            extra = extra.extra
        outcomes.append(BatchOutcome(index=index, report=report, extra=extra, stopped=stopped))
        if checkpoint_dir is not None:
            keep_keys = preserve_previous_edits or method.keeps_previous_keys
            run_state.save_state(checkpoint_dir, identity,
                                 _state_of(params, previous if keep_keys else {}, outcomes, hparams.layers))
        if stopped is not None:
            break
    return params, outcomes


def _state_of(params, previous, outcomes, layers) -> run_state.RunState:
    down = params["layers"]["down_proj"]
    return run_state.RunState(  # float32 holds bfloat16 and float16 weights exactly
        done=len(outcomes), down_proj={l: np.asarray(down[l], np.float32) for l in layers},
        carried_keys={l: np.asarray(jnp.concatenate(previous[l], axis=1)) for l in layers if previous.get(l)},
        extras=tuple(o.extra for o in outcomes), stopped=outcomes[-1].stopped if outcomes else None)


def _resume(params, saved: run_state.RunState, layers):
    """params with the saved down_proj rows, the carried keys, and the finished batches' outcomes."""
    if sorted(saved.down_proj) != sorted(layers):
        raise run_state.CheckpointError(f"the checkpoint edits layers {sorted(saved.down_proj)}, this run "
                                        f"{sorted(layers)}")
    down = params["layers"]["down_proj"]
    for layer, w in saved.down_proj.items():
        if w.shape != down.shape[1:]:
            raise run_state.CheckpointError(f"the checkpoint's down_proj of layer {layer} has shape {w.shape}, "
                                            f"the model's {down.shape[1:]}")
        down = down.at[layer].set(jnp.asarray(w, down.dtype))
    params = {**params, "layers": {**params["layers"], "down_proj": down}}
    previous = {l: ([jnp.asarray(saved.carried_keys[l])] if l in saved.carried_keys else []) for l in layers}
    outcomes = [BatchOutcome(index=i, report=None, extra=e,
                             stopped=saved.stopped if i == saved.done - 1 else None)
                for i, e in enumerate(saved.extras)]
    return params, previous, outcomes


def sequential_edit(params, cfg, tokenizer, requests, hparams, *, covariances, templates, **kwargs):
    """One fact at a time on the already-edited model (sequential-batched with batch size 1)."""
    return sequential_batched_edit(params, cfg, tokenizer, requests, hparams, covariances=covariances,
                                   templates=templates, batch_size=1, **kwargs)
