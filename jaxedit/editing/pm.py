"""The preservation-memorisation (PM) solve shared by ROME, MEMIT and EMMET.

Notation (one axis vocabulary for this module): F the MLP width (down_proj input), D the model width,
n the number of edited keys.

    W  (D, F)  the down-projection, mapping a key k (F,) to W k (D,)
    K  (F, n)  keys, one column per edit
    R  (D, n)  residuals: the desired change of W K
    C  (F, F)  a symmetric positive definite preservation matrix (e.g. the key covariance C0)

The core update is

    dW = R (ridge I_n + K^T C^-1 K)^-1 K^T C^-1                                           (1)

By the push-through identity (lam C + K K^T)^-1 K = C^-1 K (lam I + K^T C^-1 K)^-1, so (1) with
ridge = lam equals MEMIT's R K^T (lam C + K K^T)^-1, with ridge = 0 it is EMMET's equality-constrained
update, and with n = 1, ridge = 0 it is ROME's rank-one update. C is factored once per layer
(`factor_preservation`); each batch then costs two triangular solves with n right-hand sides and an
n x n eigendecomposition instead of an F x F solve. Scaling C by lam is the same as scaling the ridge
by 1/lam and dW by 1/lam, so one factor of C0 serves every lam: a sweep over lam (or ridge) is a
vmap that re-uses the triangular solves and the eigendecomposition.

A norm constraint on the update (ENCORE's): MEMIT's objective with a Frobenius term,
||dW K - R||^2 + lam ||dW K0||^2 + mu ||dW||_F^2 (K0 K0^T = C0), has its gradient zero where
dW (K K^T + lam C0 + mu I) = R K^T: MEMIT's update with C = C0 + (mu / lam) I. EMMET's and ROME's
equality-constrained updates, minimising lam ||dW K0||^2 + mu ||dW||_F^2 subject to dW K = R, are (1)
with the same C. So every method keeps its closed form and its solve; only the factored matrix moves
(`factor_preservation(C0, shift=mu / lam)`).

Numerics: everything runs in float64 (inside a `jax.enable_x64` context, also under an outer jit in
32-bit mode), whatever the input dtype; results come back as float32. A float32 Cholesky with
float32 iterative refinement cannot do as well: its forward error grows like cond(C) * 6e-8 (see
tests/jaxedit/test_pm.py for the float64-level accuracy on a cond(C) ~ 1e6 problem). Ill-conditioned
systems (duplicated or dependent keys with ridge 0) are detected from the exact spectrum of the
n x n system and regularised by the smallest ridge that brings its condition number down to
`max_cond`; the report says so. The solve never returns NaN or inf: a failed factor gives dW = 0 and
report.ok = False. `checked_pm_delta` turns both situations into ValueErrors outside jit.
"""
from __future__ import annotations

import functools
from typing import Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

DEFAULT_MAX_COND = 1e10
"""Largest condition number of the n x n system accepted without regularisation (float64 solve:
about 1e-6 relative accuracy at this bound)."""


# ------------------------------------------------------------------- float64 barrier
def _float64_call(fn, *args, **static):
    """Calls jitted fn(*args, **static) in 64-bit mode, also when a caller's vmap batches it later.

    fn computes in float64 inside its own `jax.enable_x64` block. If a transformation re-traced its
    jaxpr in 32-bit mode (as vmap of an already-jitted caller does), float64 constants would be
    narrowed and the trace would fail; the custom_vmap rule instead batches fn in 64-bit mode.
    """

    @jax.custom_batching.custom_vmap
    def call(*args):
        with jax.enable_x64(True):
            return fn(*args, **static)

    @call.def_vmap
    def call_vmap(axis_size, in_batched, *args):
        del axis_size
        in_axes = tuple(jax.tree.map(lambda b: 0 if b else None, ib) for ib in in_batched)
        batched = jax.vmap(functools.partial(fn, **static), in_axes=in_axes)
        out = _float64_call(batched, *args)  # itself a barrier, for vmaps of vmaps under jit
        return out, jax.tree.map(lambda _: True, out)

    with jax.enable_x64(True):
        return call(*args)


# ----------------------------------------------------------------------------- factor
@flax.struct.dataclass
class Preservation:
    """A factored preservation matrix: C + jitter I = chol chol^T.

    Attributes:
      chol: (F, F) float64 lower-triangular Cholesky factor.
      cond: () float32 estimate of cond(C + jitter I) (power iterations; a lower bound, usually tight).
      positive_definite: () bool, whether C itself factored (jitter == 0).
      factored: () bool, whether a finite factor exists at all (possibly after jitter).
      jitter: () float32 added to the diagonal to make C factorable (0 when C is positive definite).
      shift: () float32 added to C's diagonal on purpose before factoring (a norm constraint on the
        update, see the module docstring); the factor is of C + (shift + jitter) I.
    """

    chol: jax.Array
    cond: jax.Array
    positive_definite: jax.Array
    factored: jax.Array
    jitter: jax.Array
    shift: jax.Array = 0.0

    @property
    def size(self) -> int:
        """F, the size of C."""
        return self.chol.shape[-1]


def _symmetric_check(c: jax.Array, name: str) -> None:
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"{name} must be a square (F, F) matrix, got shape {tuple(c.shape)}")


def factor_preservation(C: jax.Array, *, shift: float = 0.0, max_relative_jitter: float = 1e-6,
                        cond_iters: int = 32) -> Preservation:
    """Factors a preservation matrix once (per layer) for `pm_delta`, in float64.

    If the Cholesky factorisation of C fails (C only semi-definite, e.g. a covariance of fewer tokens
    than F), jitter = s * mean(diag C) is added to the diagonal, s = 1e-12, 1e-10, ... up to
    `max_relative_jitter`; the result records whether that was needed. If even that fails, `factored`
    is False and `pm_delta` returns dW = 0 with report.ok = False.

    Args:
      C: (F, F) symmetric matrix, any float dtype (it is symmetrised as (C + C^T) / 2).
      shift: added to the diagonal first, in float64 (a norm constraint on the update: see above).
      max_relative_jitter: the largest diagonal jitter tried, relative to mean(diag C).
      cond_iters: power iterations for the condition estimate.
    Returns:
      Preservation (a pytree; chol is float64 even when jax runs in 32-bit mode: 8 F^2 bytes, 1.6 GB
      for Llama-3-8B's F = 14336).
    """
    _symmetric_check(C, "C")
    if not np.isfinite(shift) or shift < 0:
        raise ValueError(f"the preservation shift must be finite and >= 0, got {shift}")
    return _float64_call(_factor, C, max_relative_jitter, float(shift), cond_iters=cond_iters)


@functools.partial(jax.jit, static_argnames=("cond_iters",))
def _factor(C, max_relative_jitter, shift, *, cond_iters):
    f = C.shape[0]
    with jax.enable_x64(True):
        c = C.astype(jnp.float64)
        eye = jnp.eye(f, dtype=jnp.float64)
        c = 0.5 * (c + c.T) + jnp.asarray(shift, jnp.float64) * eye
        scale = jnp.mean(jnp.diag(c))
        scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)

        def attempt(jitter):
            chol = jnp.linalg.cholesky(c + jitter * eye)
            return chol, jnp.all(jnp.isfinite(chol))

        chol0, ok0 = attempt(0.0)

        def keep_trying(state):
            jitter, _, ok = state
            return (~ok) & (10.0 * jitter < scale * max_relative_jitter)

        def retry(state):
            jitter, _, _ = state
            jitter = jnp.where(jitter == 0, scale * 1e-12, jitter * 100.0)
            chol, ok = attempt(jitter)
            return jitter, chol, ok

        jitter, chol, ok = jax.lax.while_loop(keep_trying, retry, (jnp.float64(0.0), chol0, ok0))
        cond = _condition_estimate(c + jitter * eye, chol, cond_iters)
        return Preservation(chol=chol, cond=jnp.where(ok, cond, jnp.inf).astype(jnp.float32),
                            positive_definite=ok0, factored=ok, jitter=jitter.astype(jnp.float32),
                            shift=jnp.asarray(shift, jnp.float32))


def _condition_estimate(c: jax.Array, chol: jax.Array, iters: int) -> jax.Array:
    """lambda_max / lambda_min of SPD c (F, F) by power iteration on c and on c^-1 (via chol)."""
    f = c.shape[0]
    start = 1.0 + 0.5 * jnp.cos(jnp.arange(f, dtype=c.dtype) * 0.618)
    start = start / jnp.linalg.norm(start)

    def normalise(v):
        return v / jnp.maximum(jnp.linalg.norm(v), 1e-300)

    top = jax.lax.fori_loop(0, iters, lambda _, v: normalise(c @ v), start)
    inv = lambda v: solve_triangular(chol, solve_triangular(chol, v, lower=True), lower=True, trans="T")
    bottom = jax.lax.fori_loop(0, iters, lambda _, v: normalise(inv(v)), start)
    lam_max = top @ (c @ top)
    lam_min = bottom @ (c @ bottom)
    return jnp.where(lam_min > 0, lam_max / lam_min, jnp.inf)


# ------------------------------------------------------------------------------ solve
@flax.struct.dataclass
class PMReport:
    """Diagnostics of one PM solve (each a scalar; under vmap, one per mapped value).

    Attributes:
      cond: float32 condition number of the n x n system ridge I + K^T C^-1 K before any added
        regularisation (inf when singular).
      ridge_added: float32 ridge added on top of `ridge` so that cond <= max_cond (0 when none).
      regularised: bool, whether ridge_added > 0.
      ok: bool, whether the preservation factor was valid and dW finite (dW is 0 when not ok).
      preservation_cond: float32 condition estimate of C (from the factor).
    """

    cond: jax.Array
    ridge_added: jax.Array
    regularised: jax.Array
    ok: jax.Array
    preservation_cond: jax.Array


def _check_shapes(f: int, K, R, mask=None, W=None, ridge=None) -> None:
    """Raises ValueError naming the shapes when K (F, n), R (D, n), mask (n,), W (D, F) disagree."""
    k_shape, r_shape = tuple(np.shape(K)), tuple(np.shape(R))
    if len(k_shape) != 2:
        raise ValueError(f"keys K must be a (F, n) matrix, got shape {k_shape}")
    if len(r_shape) != 2:
        raise ValueError(f"residuals R must be a (D, n) matrix, got shape {r_shape}")
    if k_shape[0] != f:
        raise ValueError(f"keys K have {k_shape[0]} rows (shape {k_shape}) but the preservation matrix "
                         f"C is ({f}, {f}): K must be (F, n) with F = {f}")
    if r_shape[1] != k_shape[1]:
        raise ValueError(f"residuals R {r_shape} have {r_shape[1]} columns but keys K {k_shape} have "
                         f"{k_shape[1]}: one residual column per key")
    if k_shape[1] == 0:
        raise ValueError(f"no keys to edit: K has shape {k_shape}")
    if mask is not None and tuple(np.shape(mask)) != (k_shape[1],):
        raise ValueError(f"mask must have shape ({k_shape[1]},) (one flag per key column of K {k_shape}), "
                         f"got {tuple(np.shape(mask))}")
    if W is not None and tuple(np.shape(W)) != (r_shape[0], f):
        raise ValueError(f"W has shape {tuple(np.shape(W))} but keys K {k_shape} and residuals R {r_shape} "
                         f"need W of shape (D, F) = ({r_shape[0]}, {f})")
    if ridge is not None and np.ndim(ridge) != 0:
        raise ValueError(f"ridge must be a scalar (vmap over a vector of ridges), got shape {np.shape(ridge)}")


def pm_delta(factor: Preservation, K: jax.Array, R: jax.Array, ridge: float | jax.Array = 0.0,
             mask: jax.Array | None = None, max_cond: float | jax.Array = DEFAULT_MAX_COND
             ) -> tuple[jax.Array, PMReport]:
    """dW = R (ridge I + K^T C^-1 K)^-1 K^T C^-1, in float64, with C from `factor`.

    Args:
      factor: `factor_preservation(C)`.
      K: (F, n) keys.
      R: (D, n) residuals (the desired change of W K).
      ridge: scalar >= 0 (vmap over it for a sweep; the eigendecomposition is shared).
      mask: optional (n,) bool/int, 0 for padding columns (static batch shapes); padded columns take
        no part in the solve (their keys and residuals are ignored).
      max_cond: if the system's condition number exceeds this, the smallest extra ridge that brings it
        down to max_cond is added and reported.
    Returns:
      (dW (D, F) float32, PMReport). dW is exactly 0 when the report is not ok.
    Raises:
      ValueError at trace time on inconsistent shapes.
    """
    _check_shapes(factor.size, K, R, mask, ridge=ridge)
    return _float64_call(_pm_solve, factor, K, R, ridge, mask, max_cond, None)


@jax.jit
def _pm_solve(factor, K, R, ridge, mask, max_cond, W):
    """pm_delta's body; with W (D, F), R holds target values V and the residual is V - W K."""
    n = K.shape[1]
    with jax.enable_x64(True):
        chol = factor.chol.astype(jnp.float64)
        k = K.astype(jnp.float64)
        r = R.astype(jnp.float64)
        if W is not None:
            r = r - W.astype(jnp.float64) @ k
        valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
        k = jnp.where(valid[None, :], k, 0.0)
        r = jnp.where(valid[None, :], r, 0.0)

        z = solve_triangular(chol, k, lower=True)              # (F, n)  L^-1 K
        y = solve_triangular(chol, z, lower=True, trans="T")   # (F, n)  C^-1 K
        g = z.T @ z                                            # (n, n)  K^T C^-1 K
        g = 0.5 * (g + g.T)
        # Padded columns become decoupled unit-like rows whose eigenvalue lies inside the valid
        # spectrum (the mean valid diagonal), so they change neither the solution nor cond.
        n_valid = jnp.sum(valid)
        fill = jnp.sum(jnp.where(valid, jnp.diag(g), 0.0)) / jnp.maximum(n_valid, 1)
        fill = jnp.where(fill > 0, fill, 1.0)
        both = valid[:, None] & valid[None, :]
        g = jnp.where(both, g, 0.0) + jnp.diag(jnp.where(valid, 0.0, fill))

        evals, evecs = jnp.linalg.eigh(g)                      # shared across a vmap over ridge
        evals = evals + jnp.asarray(ridge, jnp.float64)
        lam_max, lam_min = jnp.max(evals), jnp.min(evals)
        cond = jnp.where(lam_min > 0, lam_max / jnp.where(lam_min > 0, lam_min, 1.0), jnp.inf)
        floor = jnp.where(lam_max > 0, lam_max / jnp.asarray(max_cond, jnp.float64), 1.0)
        added = jnp.maximum(floor - lam_min, 0.0)
        coeff = (evecs.T @ r.T) / (evals + added)[:, None]     # (n, D)
        dw = (y @ (evecs @ coeff)).T                           # (D, F)

        ok = factor.factored & jnp.all(jnp.isfinite(dw))
        dw = jnp.where(ok, dw, 0.0).astype(jnp.float32)
        report = PMReport(cond=cond.astype(jnp.float32), ridge_added=added.astype(jnp.float32),
                          regularised=added > 0, ok=ok,
                          preservation_cond=factor.cond.astype(jnp.float32))
    return dw, report


def _as_factor(C: Union[jax.Array, Preservation]) -> Preservation:
    return C if isinstance(C, Preservation) else factor_preservation(C)


def checked_pm_delta(C: Union[jax.Array, Preservation], K, R, ridge: float = 0.0, *, W=None, mask=None,
                     max_cond: float = DEFAULT_MAX_COND, allow_regularisation: bool = False
                     ) -> tuple[jax.Array, PMReport]:
    """`pm_delta` with checks, for use outside jit: raises ValueError on anything suspicious.

    Args:
      C: the (F, F) preservation matrix or its `factor_preservation`.
      K, R, ridge, mask, max_cond: as in `pm_delta`.
      W: optional (D, F) weight, only to check that dW will fit it.
      allow_regularisation: accept a jittered C and a regularised n x n system (as reported) instead
        of raising.
    Returns:
      (dW (D, F) float32, PMReport) with concrete values.
    Raises:
      ValueError: wrong shapes, non-finite inputs, C not symmetric / not positive definite, or a
        singular or ill-conditioned system (duplicated or linearly dependent keys with ridge 0).
    """
    if not isinstance(C, Preservation):
        c = np.asarray(C, np.float64)
        _symmetric_check(c, "C")
        if not np.all(np.isfinite(c)):
            raise ValueError("the preservation matrix C contains NaN or inf")
        asym = np.abs(c - c.T).max() / max(np.abs(c).max(), 1e-300)
        if asym > 1e-5:
            raise ValueError(f"the preservation matrix C is not symmetric (max |C - C^T| / max |C| = {asym:.2g})")
    f = C.size if isinstance(C, Preservation) else np.shape(C)[0]
    _check_shapes(f, K, R, mask, W=W, ridge=ridge)
    for name, x in (("keys K", K), ("residuals R", R)):
        if not np.all(np.isfinite(np.asarray(x, np.float64))):
            raise ValueError(f"{name} contain NaN or inf")
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    factor = _as_factor(C)
    if not bool(factor.factored):
        raise ValueError(f"the preservation matrix C ({f}, {f}) is not positive definite and could not be "
                         f"factored even with diagonal jitter; is it a covariance of enough tokens?")
    if not bool(factor.positive_definite) and not allow_regularisation:
        raise ValueError(f"the preservation matrix C ({f}, {f}) is not positive definite (Cholesky failed; "
                         f"it factors with jitter {float(factor.jitter):.3g} on the diagonal). Use more "
                         f"covariance samples or pass allow_regularisation=True")
    dw, report = pm_delta(factor, K, R, ridge, mask, max_cond)
    if not bool(report.ok):
        raise ValueError("the PM solve produced non-finite values")
    if bool(report.regularised) and not allow_regularisation:
        n = np.shape(K)[1]
        raise ValueError(
            f"the {n}x{n} system ridge*I + K^T C^-1 K (ridge={ridge}) is singular or ill-conditioned "
            f"(condition number {float(report.cond):.3g} > max_cond {max_cond:.3g}); are keys duplicated "
            f"or linearly dependent? Use ridge > 0 or allow_regularisation=True")
    return dw, report


# --------------------------------------------------------------------- named editors
def rome_delta(C0: Union[jax.Array, Preservation], W: jax.Array, k: jax.Array, v: jax.Array, *,
               max_cond: float = DEFAULT_MAX_COND, return_report: bool = False):
    """ROME's rank-one update dW = (v - W k) k^T C0^-1 / (k^T C0^-1 k).

    The PM core with n = 1, ridge = 0, R = v - W k (computed in float64), so (W + dW) k = v exactly;
    the scale of C0 cancels.

    Args:
      C0: (F, F) key covariance or its `factor_preservation`.
      W: (D, F) current down-projection of the edited layer.
      k: (F,) key; v: (D,) the value W + dW must map k to.
      return_report: also return the PMReport.
    Returns:
      dW (D, F) float32 (and the PMReport if asked).
    """
    if np.ndim(k) != 1 or np.ndim(v) != 1:
        raise ValueError(f"rome_delta takes one key k (F,) and one value v (D,), got shapes "
                         f"{tuple(np.shape(k))} and {tuple(np.shape(v))}")
    factor = _as_factor(C0)
    _check_shapes(factor.size, np.empty((np.shape(k)[0], 1)), np.empty((np.shape(v)[0], 1)), W=W)
    dw, report = _float64_call(_pm_solve, factor, k[:, None], v[:, None], 0.0, None, max_cond, W)
    return (dw, report) if return_report else dw


def memit_delta(C0: Union[jax.Array, Preservation], K: jax.Array, R: jax.Array, lam: float | jax.Array, *,
                mask: jax.Array | None = None, max_cond: float = DEFAULT_MAX_COND,
                return_report: bool = False):
    """MEMIT's update dW = R K^T (lam C0 + K K^T)^-1 (lam = mom2_update_weight).

    Computed as the PM core on the factor of C0 with ridge = lam:
    R K^T (lam C0 + K K^T)^-1 = R (lam I + K^T C0^-1 K)^-1 K^T C0^-1 (push-through identity), which is
    the core with C = lam C0 and ridge 1. lam may be traced (vmap over a vector of lams).

    Args:
      C0: (F, F) key covariance (unscaled) or its `factor_preservation`.
      K: (F, n) keys; R: (D, n) residuals of this layer (see `spread_residual`).
      lam: preservation weight > 0.
    Returns:
      dW (D, F) float32 (and the PMReport if asked).
    """
    dw, report = pm_delta(_as_factor(C0), K, R, lam, mask, max_cond)
    return (dw, report) if return_report else dw


def emmet_delta(C0: Union[jax.Array, Preservation], K: jax.Array, R: jax.Array, lam: float | jax.Array,
                emmet_lambda: float | jax.Array, *, mask: jax.Array | None = None,
                max_cond: float = DEFAULT_MAX_COND, return_report: bool = False):
    """EMMET's equality-constrained batch update dW = R (K^T C^-1 K + emmet_lambda I)^-1 K^T C^-1, C = lam C0.

    As in the EMMET reference code (scalable-model-editing/unified-model-editing, emmet/emmet_main.py,
    checked, not copied): the covariance is scaled first, C = mom2_update_weight * C0 (lam here);
    D = K^T C^-1 K gets `emmet_lambda * I` added only when the batch has more than one edit ("to
    counter ill-conditioned D"); the update is resid @ (D^-1 K^T C^-1) with resid the residual
    already spread over the edited layers. (Its optional `update_norm_lambda * I` added to C is not
    part of this function: add it to C0 before factoring if wanted.)

    Since (K^T (lam C0)^-1 K + e I)^-1 K^T (lam C0)^-1 = (K^T C0^-1 K + lam e I)^-1 K^T C0^-1, this is
    the PM core on the factor of C0 with ridge = lam * emmet_lambda (0 for a single edit).

    Args:
      C0: (F, F) key covariance (unscaled) or its `factor_preservation`.
      K: (F, n) keys; R: (D, n) residuals.
      lam: mom2_update_weight > 0; emmet_lambda: EMMET's ridge (>= 0).
      mask: optional (n,) validity of the key columns (the n > 1 rule uses the static n).
    Returns:
      dW (D, F) float32 (and the PMReport if asked).
    """
    ridge = 0.0 if np.shape(K)[-1] == 1 else lam * emmet_lambda
    dw, report = pm_delta(_as_factor(C0), K, R, ridge, mask, max_cond)
    return (dw, report) if return_report else dw


def spread_residual(targets: jax.Array, layer_position: int | jax.Array, num_layers: int | jax.Array) -> jax.Array:
    """The share of the remaining residual written into the `layer_position`-th of `num_layers` layers.

    MEMIT (and EMMET) edit layers in increasing order; before each they recompute what is still
    missing (targets, (D, n)) and write targets / (num_layers - layer_position) into this layer, so
    the residual is spread evenly over the layers still to edit.

    Args:
      targets: (D, n) remaining residual at the current layer.
      layer_position: 0-based position of the layer among the edited layers (may be traced).
      num_layers: how many layers are edited.
    Returns:
      (D, n) residual for this layer.
    """
    if isinstance(layer_position, int) and isinstance(num_layers, int) and not 0 <= layer_position < num_layers:
        raise ValueError(f"layer_position {layer_position} must be in [0, num_layers={num_layers})")
    remaining = jnp.asarray(num_layers) - jnp.asarray(layer_position)
    return targets / remaining.astype(targets.dtype)


# ------------------------------------------------------------------ null-space update
@flax.struct.dataclass
class NullSpace:
    """The directions of key space that the preserved keys hardly use, for AlphaEdit.

    The eigendecomposition C0 = Q diag(eigenvalues) Q^T in float64; `null` marks the eigenvectors
    whose eigenvalue lies below the threshold. P = Q_null Q_null^T projects onto their span: an update
    dW = X P changes W k by dW k = X P k, at most threshold-sized for the keys C0 summarises
    (||dW K0||^2 / N = tr(X P C0 P X^T) <= threshold ||X||^2). Shapes stay (F, F) and (F,) whatever
    the rank, so one compiled solve serves every layer and threshold.

    Attributes:
      eigenvectors: (F, F) float64 Q, one eigenvector per column.
      eigenvalues: (F,) float64, ascending.
      null: (F,) bool, eigenvalues < threshold.
      threshold: () float64.
    """

    eigenvectors: jax.Array
    eigenvalues: jax.Array
    null: jax.Array
    threshold: jax.Array

    @property
    def size(self) -> int:
        return self.eigenvectors.shape[-1]

    @property
    def rank(self) -> int:
        """How many directions the update may use (the dimension of the null space)."""
        return int(np.sum(np.asarray(self.null)))

    def with_threshold(self, threshold: float) -> "NullSpace":
        """The same eigendecomposition cut at another threshold (no new eigendecomposition)."""
        with jax.enable_x64(True):
            t = jnp.asarray(threshold, jnp.float64)
            return self.replace(null=self.eigenvalues < t, threshold=t)


def eigen_preservation(C0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(eigenvalues ascending (F,), eigenvectors (F, F)) of the symmetrised C0, in float64."""
    _symmetric_check(C0, "C0")
    return _float64_call(_eigh, C0)


@jax.jit
def _eigh(C0):
    with jax.enable_x64(True):
        c = C0.astype(jnp.float64)
        return jnp.linalg.eigh(0.5 * (c + c.T))


def null_space(C0: jax.Array, threshold: float, *, eigen: tuple | None = None) -> NullSpace:
    """The NullSpace of C0 (F, F) at `threshold` (the AlphaEdit reference code's nullspace_threshold:
    eigenvalues of the uncentred key covariance E[k k^T] below it). eigen: a precomputed
    `eigen_preservation(C0)` (e.g. from a cache) instead of a new eigendecomposition."""
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"the null-space threshold must be a finite number > 0, got {threshold}")
    evals, evecs = eigen_preservation(C0) if eigen is None else eigen
    with jax.enable_x64(True):
        evals = jnp.asarray(evals, jnp.float64)
        evecs = jnp.asarray(evecs, jnp.float64)
        t = jnp.asarray(threshold, jnp.float64)
        return NullSpace(eigenvectors=evecs, eigenvalues=evals, null=evals < t, threshold=t)


def alphaedit_delta(space: NullSpace, K: jax.Array, R: jax.Array, l2: float | jax.Array, *,
                    previous_keys: jax.Array | None = None, mask: jax.Array | None = None
                    ) -> tuple[jax.Array, PMReport]:
    """AlphaEdit's update dW = R K^T P (K K^T P + K_p K_p^T P + l2 I)^-1, in float64.

    With P = U U^T (U: the null-space eigenvectors) and the push-through identity, this is

        dW = R (U^T K)^T (l2 I + U^T (K K^T + K_p K_p^T) U)^-1 U^T,

    the least-squares update restricted to the null space: minimise ||dW K - R||^2 + ||dW K_p||^2
    + l2 ||dW||^2 over dW = X U^T. The system is solved in the full eigenbasis with the directions
    outside the null space decoupled (their rows hold l2 alone), so its shape is (F, F) whatever the
    rank; its eigenvalues lie in [l2, l2 + ||U^T A U||], so it is well conditioned for l2 > 0 and
    never singular: no NaN.

    Args:
      space: `null_space(C0, threshold)` of the edited layer.
      K: (F, n) keys; R: (D, n) residuals of this layer (`spread_residual`).
      l2: the ridge (the reference code's L2), > 0.
      previous_keys: (F, m) keys written by earlier edits (sequential editing), kept in place.
      mask: optional (n,) validity of K's columns (padding).
    Returns:
      (dW (D, F) float32, PMReport): cond is that of the (F, F) system, ridge_added 0.
    """
    _check_shapes(space.size, K, R, mask)
    if previous_keys is not None and (np.ndim(previous_keys) != 2 or np.shape(previous_keys)[0] != space.size):
        raise ValueError(f"previous keys must be a (F, m) matrix with F = {space.size}, got shape "
                         f"{tuple(np.shape(previous_keys))}")
    if previous_keys is None:
        previous_keys = np.zeros((space.size, 0), np.float32)
    return _float64_call(_alphaedit_solve, space, K, R, l2, previous_keys, mask)


def _eigen_cond(evals):
    return jnp.where(evals[0] > 0, evals[-1] / jnp.where(evals[0] > 0, evals[0], 1.0), jnp.inf)


@jax.jit
def _alphaedit_solve(space, K, R, l2, previous_keys, mask):
    n = K.shape[1]
    with jax.enable_x64(True):
        q = space.eigenvectors.astype(jnp.float64)
        null = space.null.astype(jnp.float64)
        valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
        k = jnp.where(valid[None, :], K.astype(jnp.float64), 0.0)
        r = jnp.where(valid[None, :], R.astype(jnp.float64), 0.0)
        l2 = jnp.asarray(l2, jnp.float64)
        gk = null[:, None] * (q.T @ k)                                   # (F, n)  U^T K, in the eigenbasis
        gp = null[:, None] * (q.T @ previous_keys.astype(jnp.float64))   # (F, m)
        system = gk @ gk.T + gp @ gp.T + l2 * jnp.eye(q.shape[0], dtype=jnp.float64)
        chol = jnp.linalg.cholesky(system)
        y = solve_triangular(chol, solve_triangular(chol, gk, lower=True), lower=True, trans="T")  # (F, n)
        dw = (r @ y.T) @ (null[:, None] * q.T)                           # (D, F)
        cond = _condition_estimate(system, chol, 32)
        ok = (l2 > 0) & jnp.all(jnp.isfinite(dw))
        dw = jnp.where(ok, dw, 0.0).astype(jnp.float32)
        report = PMReport(cond=cond.astype(jnp.float32), ridge_added=jnp.float32(0.0), regularised=jnp.bool_(False),
                          ok=ok, preservation_cond=_eigen_cond(space.eigenvalues).astype(jnp.float32))
    return dw, report
