"""Cheap checks that run before the value optimisation, so that a bad C0, bad templates or values made
for another edit cost seconds, not the minutes of the value loop on a large model.

What is refused raises ValueError naming the problem. What is repaired (a preservation matrix that is
only semi-definite, made factorable by a small diagonal jitter, when the caller allows it) is
returned as a sentence for EditReport.repairs and logged.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxedit.editing import pm

logger = logging.getLogger(__name__)

# The jitter tried on a semi-definite C0, relative to its mean diagonal: enough for the rounding of a
# float32 C0 built from fewer tokens than its size (eigenvalues down to about -1e-5 of the mean).
MAX_RELATIVE_JITTER = 1e-3
# The asymmetry of C0 taken as rounding, relative to its largest entry (pm.checked_pm_delta's bound).
MAX_RELATIVE_ASYMMETRY = 1e-5


def check_template_groups(groups) -> tuple[tuple[str, ...], ...]:
    """Context template groups as editors take them: (("{}",), (t1, ...), ...).

    The first group must be the bare "{}": the initial value and the residual are read at the bare
    prompt, which is the first template's row. Every template holds exactly one "{}".
    """
    if isinstance(groups, str) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise ValueError(f"context templates must be a non-empty sequence of template groups, got {groups!r}")
    out = []
    for g, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) == 0:
            raise ValueError(f"context template group {g} must be a non-empty sequence of templates, got {group!r}")
        for t in group:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"context template {t!r} (group {g}) must be a string with exactly one '{{}}' "
                                 "where the prompt goes")
        out.append(tuple(group))
    if out[0] != ("{}",):
        raise ValueError(f"the first context template group must be the bare ('{{}}',), got {out[0]!r}: the "
                         "initial value and the residual are read at the bare prompt")
    return tuple(out)


def _check_layers_present(covariances: Mapping, layers: Sequence[int]) -> None:
    missing = [l for l in layers if l not in covariances]
    if missing:
        raise ValueError(f"no preservation covariance for layer(s) {missing}; have {sorted(covariances)}")


def checked_covariance(c, layer: int, size: int):
    """C0 of `layer` as a jax array, or ValueError: wrong shape, NaN/inf, all zeros, not symmetric."""
    shape = tuple(np.shape(c))
    if shape != (size, size):
        raise ValueError(f"the preservation covariance of layer {layer} has shape {shape}; the model's "
                         f"MLP width needs ({size}, {size})")
    c = jnp.asarray(c)
    if not bool(jnp.all(jnp.isfinite(c))):
        raise ValueError(f"the preservation covariance of layer {layer} contains NaN or inf")
    if not bool(jnp.any(c != 0)):
        raise ValueError(f"the preservation covariance of layer {layer} is all zeros (a covariance of no "
                         "tokens?)")
    asymmetry = float(jnp.max(jnp.abs(c - c.T)) / jnp.max(jnp.abs(c)))
    if asymmetry > MAX_RELATIVE_ASYMMETRY:  # the solve would symmetrise it: another matrix than the one given
        raise ValueError(f"the preservation covariance of layer {layer} is not symmetric (max |C - C^T| / max |C| = "
                         f"{asymmetry:.2g}, more than the {MAX_RELATIVE_ASYMMETRY:g} of rounding): pass E[k k^T] "
                         "itself (e.g. from preservation_covariance), not a transformed or mis-shaped copy")
    return c


def null_spaces(covariances: Mapping, layers: Sequence[int], size: int, threshold: float
                ) -> tuple[dict[int, pm.NullSpace], list[str]]:
    """AlphaEdit's null space of every edited layer at `threshold`.

    Args:
      covariances: {layer: C0 (F, F) or pm.NullSpace (e.g. from jaxedit.editing.null_space, cached)};
        a NullSpace cut at another threshold is re-cut at this one.
    Returns:
      ({layer: NullSpace}, warnings: sentences for EditReport.warnings).
    Raises:
      ValueError: a layer without C0, a bad C0 (see checked_covariance), a NullSpace of another size,
        or a threshold under every eigenvalue (no direction left to edit).
    """
    _check_layers_present(covariances, layers)
    spaces, warnings = {}, []
    for layer in layers:
        c = covariances[layer]
        if isinstance(c, pm.NullSpace):
            if c.size != size:
                raise ValueError(f"the null space of layer {layer} is for F = {c.size}; the model has F = {size}")
            space = c.with_threshold(threshold)
        else:
            space = pm.null_space(checked_covariance(c, layer, size), threshold)
        rank, smallest = space.rank, float(space.eigenvalues[0])
        if rank == 0:
            raise ValueError(f"layer {layer}: no eigenvalue of C0 is below the null-space threshold {threshold:g} "
                             f"(the smallest is {smallest:.3g}), so AlphaEdit has no direction to edit in; raise "
                             "nullspace_threshold")
        if rank == size:
            warnings.append(f"layer {layer}: every eigenvalue of C0 is below the null-space threshold {threshold:g} "
                            f"(the largest is {float(space.eigenvalues[-1]):.3g}): the update preserves nothing")
            logger.warning("%s", warnings[-1])
        spaces[layer] = space
    return spaces, warnings


def preservation_factors(covariances: Mapping, layers: Sequence[int], size: int, *,
                         allow_jitter: bool = False, shift: float = 0.0) -> tuple[dict[int, pm.Preservation], list[str]]:
    """Checks and factors the preservation matrix of every edited layer.

    Args:
      covariances: {layer: C0 (F, F) or pm.factor_preservation(C0)}.
      layers: the edited layers.
      size: F, the model's MLP width.
      allow_jitter: accept a C0 that is only semi-definite (e.g. from fewer corpus tokens than F)
        after adding the smallest diagonal jitter that makes it factorable; it is reported.
      shift: added to C0's diagonal before factoring (a norm constraint, see jaxedit.editing.pm); a
        given factor must have been made with the same shift.
    Returns:
      ({layer: Preservation}, repairs: sentences saying what was regularised).
    Raises:
      ValueError: a layer without C0, a wrong shape, NaN/inf, an all-zero C0, or a C0 that is not
        positive definite (unless allow_jitter) or cannot be factored at all.
    """
    _check_layers_present(covariances, layers)
    factors, repairs = {}, []
    for layer in layers:
        c = covariances[layer]
        if not isinstance(c, pm.Preservation):
            c = pm.factor_preservation(checked_covariance(c, layer, size), shift=shift,
                                       max_relative_jitter=MAX_RELATIVE_JITTER if allow_jitter else 0.0)
        elif not np.isclose(float(c.shift), shift, rtol=1e-6, atol=0.0):
            raise ValueError(f"the preservation factor of layer {layer} was made with shift {float(c.shift):.6g}; "
                             f"these hparams' norm constraint needs {shift:.6g} (factor C0 with "
                             "pm.factor_preservation(C0, shift=hparams.preservation_shift), or pass C0)")
        elif c.size != size:
            raise ValueError(f"the preservation factor of layer {layer} is for F = {c.size}; the model has F = {size}")
        if not bool(c.factored):
            raise ValueError(
                f"the preservation covariance of layer {layer} ({size} x {size}) is not positive definite"
                + (" and stays singular with diagonal jitter" if allow_jitter else
                   "; it was probably computed from fewer corpus tokens than its size "
                   "(use more covariance samples, or pass allow_jitter=True to regularise it, reported)"))
        if not bool(c.positive_definite):
            if not allow_jitter:
                raise ValueError(f"the preservation factor of layer {layer} needed diagonal jitter "
                                 f"{float(c.jitter):.3g}; pass allow_jitter=True to accept it")
            repairs.append(f"layer {layer}: C0 is not positive definite (too few corpus tokens for F = {size}?); "
                           f"added {float(c.jitter):.3g} to its diagonal")
            logger.warning("preservation covariance: %s", repairs[-1])
        factors[layer] = c
    return factors, repairs


def check_update_norm(layer: int, delta_norm: float, weight_norm: float, n_requests: int = 1) -> str | None:
    """The warning for an update out of proportion to its layer: ||dW||_F > sqrt(n) ||W||_F for n
    requests, i.e. more than the layer's own norm per request (norms of independent edits add in
    quadrature, so a batch's update grows like sqrt(n)).

    On SmolLM2 (||W|| 174 at layer 3) MEMIT batches of 16, 64 and 256 CounterFact facts at lambda
    100 give ||dW|| 86, 181 and 390, i.e. 22-24 per sqrt(request), an eighth of the layer; one fact
    with two targets under EMMET's equality constraints gave 1,540 for 2 requests (1,089 per
    sqrt(request), six times the layer). Such an update (conflicting requests, a degenerate C0)
    overwrites what the layer stored.
    """
    limit = float(np.sqrt(max(n_requests, 1))) * weight_norm
    if delta_norm > limit:
        warning = (f"layer {layer}: the update's norm {delta_norm:.4g} exceeds sqrt({n_requests}) x the layer's "
                   f"own {weight_norm:.4g}: the edit overwrites the layer (conflicting requests, or a "
                   "degenerate C0?)")
        logger.warning("%s", warning)
        return warning
    return None
