"""Scaling strategies over params: batch, sequential and sequential-batched editing."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxedit.editing import pm, preflight
from jaxedit.editing.editor import EditReport, edit, with_previous_keys
from jaxedit.editing.values import Values
from jaxedit.hparams import EditHparams
from jaxedit.requests import EditRequest, validate_batch


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """One applied batch: its index, its report, and what `after_batch` returned (e.g. metrics)."""

    index: int
    report: EditReport
    extra: Any = None


def batch_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
               covariances, templates, **kwargs):
    """All requests in one update. Returns (new params, EditReport)."""
    return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates, **kwargs)


def sequential_batched_edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
                            covariances, templates, batch_size: int, preserve_previous_edits: bool = False,
                            after_batch: Callable[[int, Any, tuple, EditReport], Any] | None = None,
                            first_values: Values | None = None, progress: bool = True, **kwargs):
    """Batches of `batch_size` applied one after another, keys and values recomputed on the current
    (already edited) params each time.

    Args:
      preserve_previous_edits: add the keys written by earlier batches to the preservation term
        (C0 + K_prev K_prev^T / lambda), so later batches keep earlier edits in place. AlphaEdit
        always does (its update keeps the earlier keys K_p in place; the method says so:
        Method.keeps_previous_keys), with C0's null space computed once.
      after_batch: called as after_batch(index, params, batch, report) right after each batch (e.g. to
        measure metrics then); its return value is kept in BatchOutcome.extra.
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
        fixed = {l: c if isinstance(c, pm.Preservation) else pm.factor_preservation(jnp.asarray(c))
                 for l, c in covariances.items()}
    else:  # earlier keys change the preservation matrix every batch
        fixed = None
        if any(isinstance(c, pm.Preservation) for c in covariances.values()):
            raise ValueError("preserve_previous_edits needs the covariance matrices C0, not their factors")
    previous: dict[int, list] = {l: [] for l in hparams.layers}
    outcomes = []
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    for index, batch in enumerate(tqdm(batches, desc=f"{hparams.method} batches of {batch_size}",
                                       disable=not progress)):
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
        outcomes.append(BatchOutcome(index=index, report=report, extra=extra))
    return params, outcomes


def sequential_edit(params, cfg, tokenizer, requests, hparams, *, covariances, templates, **kwargs):
    """One fact at a time on the already-edited model (sequential-batched with batch size 1)."""
    return sequential_batched_edit(params, cfg, tokenizer, requests, hparams, covariances=covariances,
                                   templates=templates, batch_size=1, **kwargs)
