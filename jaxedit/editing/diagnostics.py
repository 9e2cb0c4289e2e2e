"""What one batch's preservation-memorisation solve says about itself: cost, residual and key geometry.

Notation as in jaxedit.editing.pm: W (D, F) the down-projection before the update, dW (D, F) the
update, K (F, n) the batch's keys, R (D, n) the residuals written (so the solve's targets at the keys
are V = W K + R), C0 (F, F) the preserved keys' covariance, G = K^T C0^-1 K (n, n) the key Gram
matrix in the C0^-1 metric (the n x n system of the solve, before its ridge).

  preservation_cost     tr(dW C0 dW^T) / tr(W C0 W^T): how much the update changes the outputs of the
                        preserved keys, relative to those outputs (E||dW k||^2 / E||W k||^2 over C0's keys)
  residual              ||(W + dW) K - V|| / ||V||: how far the batch's own keys miss their targets
  gram_min_eigenvalue   the smallest eigenvalue of G (0 once the keys are dependent, e.g. n > F);
  gram_max_eigenvalue   the largest
  effective_rank        exp(entropy of G's eigenvalues normalised to sum 1) (Roy & Vetterli 2007):
                        n for equal eigenvalues, 1 for one direction
  participation_ratio   (sum l)^2 / sum l^2 of G's eigenvalues: the same two limits, weighted
                        towards the large eigenvalues
  coherence             max over i != j of |G_ij| / sqrt(G_ii G_jj): the largest |cosine| between two
                        keys in the C0^-1 metric; mean_coherence the mean over pairs
  key_norm              mean of G_ii (the keys' squared C0^-1 norm)
  delta_norm            ||dW||_F
  top_share             {fraction q: the share of ||dW||_F^2 in the span of C0's top ceil(q F)
                        eigenvectors (largest eigenvalues)}; an update spread evenly over the key space
                        puts q there

Why the C0^-1 metric: the update is dW = R (ridge I + G)^-1 K^T C0^-1, so dW x = dW x_par, where x_par
is the C0^-1-orthogonal projection of x onto span(K): `span_fraction` measures how much of a key the
update can move (for the equality-constrained solve exactly, for MEMIT's ridge up to the ridge's
damping).

Everything is computed in float64 (inside `jax.enable_x64`), from C0's float64 eigendecomposition
(pm.eigen_preservation; pass it as `eigen` to reuse it across the batches of one layer).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.editing import pm

DEFAULT_TOP_FRACTIONS = (0.01, 0.1)


@dataclasses.dataclass(frozen=True)
class SolveDiagnostics:
    """The solve diagnostics of one batch (see the module docstring); floats, for a results record."""

    n_keys: int
    width: int
    preservation_cost: float
    residual: float
    gram_min_eigenvalue: float
    gram_max_eigenvalue: float
    effective_rank: float
    participation_ratio: float
    coherence: float
    mean_coherence: float
    key_norm: float
    delta_norm: float
    top_share: dict

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["top_share"] = {f"{q:g}": v for q, v in self.top_share.items()}
        return d


def _check_eigen(eigen, f: int):
    evals, evecs = eigen
    if np.shape(evals) != (f,) or np.shape(evecs) != (f, f):
        raise ValueError(f"eigen must be C0's (eigenvalues (F,), eigenvectors (F, F)) with F = {f}, got shapes "
                         f"{tuple(np.shape(evals))} and {tuple(np.shape(evecs))}")
    smallest = float(np.min(np.asarray(evals)))
    if not smallest > 0:
        raise ValueError(f"C0 is not positive definite (smallest eigenvalue {smallest:.3g}): the C0^-1 metric of "
                         "the diagnostics needs an invertible C0 (a covariance of more tokens than its size)")


def _eigen_of(C0, eigen):
    if eigen is None:
        eigen = pm.eigen_preservation(C0)  # as given: a float64 NumPy C0 stays float64
    _check_eigen(eigen, np.shape(eigen[0])[0])
    return eigen


def top_counts(width: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """How many of C0's top eigenvectors each fraction q of the width F names: ceil(q F), at least 1."""
    for q in fractions:
        if not 0 < q <= 1:
            raise ValueError(f"top fractions must lie in (0, 1], got {q}")
    return tuple(max(1, math.ceil(q * width - 1e-9)) for q in fractions)


def solve_diagnostics(C0, W, K, R, dW, *, top_fractions: Sequence[float] = DEFAULT_TOP_FRACTIONS,
                      eigen: tuple | None = None) -> SolveDiagnostics:
    """The diagnostics of the update dW that a solve wrote for keys K (F, n) and residuals R (D, n).

    Args:
      C0: (F, F) the preserved keys' covariance the solve used (unscaled; any float dtype), or None
        when `eigen` is given.
      W: (D, F) the layer's down_proj before the update; dW: (D, F) the update.
      K: (F, n) keys; R: (D, n) residuals (the solve's targets are V = W K + R).
      top_fractions: fractions q of the width whose top eigenvectors' share of ||dW||_F^2 is reported.
      eigen: C0's (eigenvalues (F,), eigenvectors (F, F)) from pm.eigen_preservation, to reuse.
    Returns:
      SolveDiagnostics.
    Raises:
      ValueError: shapes that disagree, or a C0 that is not positive definite.
    """
    f = np.shape(K)[0] if np.ndim(K) == 2 else None
    if np.ndim(K) != 2 or np.ndim(R) != 2 or np.shape(R)[1] != np.shape(K)[1]:
        raise ValueError(f"K must be (F, n) and R (D, n) with the same n, got shapes {tuple(np.shape(K))} and "
                         f"{tuple(np.shape(R))}")
    d = np.shape(R)[0]
    for name, x in (("W", W), ("dW", dW)):
        if tuple(np.shape(x)) != (d, f):
            raise ValueError(f"{name} must be (D, F) = ({d}, {f}) like R and K, got shape {tuple(np.shape(x))}")
    eigen = _eigen_of(C0, eigen)
    if np.shape(eigen[0])[0] != f:
        raise ValueError(f"C0 is {np.shape(eigen[0])[0]} x {np.shape(eigen[0])[0]} but the keys have F = {f} rows")
    counts = top_counts(f, top_fractions)
    with jax.enable_x64(True):
        out = jax.device_get(_diagnostics(*eigen, W, K, R, dW, counts=counts))
    scalars = {k: float(v) for k, v in out.items() if k != "top_share"}
    return SolveDiagnostics(n_keys=int(np.shape(K)[1]), width=int(f),
                            top_share={float(q): float(s) for q, s in zip(top_fractions, out["top_share"])},
                            **scalars)


@functools.partial(jax.jit, static_argnames=("counts",))
def _diagnostics(evals, evecs, W, K, R, dW, *, counts):
    with jax.enable_x64(True):
        lam = evals.astype(jnp.float64)
        q = evecs.astype(jnp.float64)
        w, k, r, dw = (x.astype(jnp.float64) for x in (W, K, R, dW))
        # Traces in C0's eigenbasis: tr(X C0 X^T) = sum_j lam_j ||X q_j||^2.
        dwq, wq = dw @ q, w @ q
        cost = jnp.sum(lam * jnp.sum(dwq ** 2, axis=0)) / jnp.sum(lam * jnp.sum(wq ** 2, axis=0))
        v = w @ k + r
        residual = jnp.linalg.norm(dw @ k - r) / jnp.linalg.norm(v)
        qk = q.T @ k                                           # (F, n) keys in C0's eigenbasis
        g = qk.T @ (qk / lam[:, None])                         # K^T C0^-1 K
        g = 0.5 * (g + g.T)
        gl = jnp.linalg.eigvalsh(g)
        pos = jnp.maximum(gl, 0.0)
        p = pos / jnp.sum(pos)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
        diag = jnp.diag(g)
        cos = jnp.abs(g) / jnp.sqrt(diag[:, None] * diag[None, :])
        n = g.shape[0]
        off = ~jnp.eye(n, dtype=bool)
        coherence = jnp.max(jnp.where(off, cos, 0.0)) if n > 1 else jnp.float64(0.0)
        mean_coherence = jnp.sum(jnp.where(off, cos, 0.0)) / max(n * (n - 1), 1)
        energy = jnp.sum(dwq ** 2, axis=0)                     # ||dW q_j||^2, eigenvalues ascending
        total = jnp.sum(energy)
        top = jnp.stack([jnp.sum(energy[-c:]) for c in counts]) / jnp.where(total > 0, total, 1.0)
        return {"preservation_cost": cost, "residual": residual, "gram_min_eigenvalue": gl[0],
                "gram_max_eigenvalue": gl[-1], "effective_rank": jnp.exp(entropy),
                "participation_ratio": jnp.sum(pos) ** 2 / jnp.sum(pos ** 2), "coherence": coherence,
                "mean_coherence": mean_coherence, "key_norm": jnp.mean(diag), "delta_norm": jnp.sqrt(total),
                "top_share": top}


def span_fraction(C0, K, X, *, eigen: tuple | None = None, rcond: float = 1e-10) -> np.ndarray:
    """For each column x of X (F, m): the fraction of its squared C0^-1 norm inside span(K) (K (F, n)),
    x^T A K G^+ K^T A x / x^T A x with A = C0^-1, G = K^T A K (pseudo-inverse: eigenvalues below
    rcond * the largest count as 0, so dependent keys, n > F, are fine). In [0, 1]; 1 once K spans
    the whole space. Returns (m,) float64."""
    eigen = _eigen_of(C0, eigen)
    _check_columns(eigen, K, X)
    with jax.enable_x64(True):
        return np.asarray(_span_fraction(*eigen, K, X, rcond))


def own_key_fraction(C0, K, X, *, eigen: tuple | None = None) -> np.ndarray:
    """For each i: the fraction of X[:, i]'s squared C0^-1 norm along K[:, i] alone (the squared cosine
    of the two in the C0^-1 metric; span_fraction with a one-key span). K and X (F, m). Returns (m,)."""
    eigen = _eigen_of(C0, eigen)
    _check_columns(eigen, K, X)
    if np.shape(K) != np.shape(X):
        raise ValueError(f"own_key_fraction pairs K and X column by column: shapes {tuple(np.shape(K))} and "
                         f"{tuple(np.shape(X))} differ")
    with jax.enable_x64(True):
        return np.asarray(_own_fraction(*eigen, K, X))


def _check_columns(eigen, K, X) -> None:
    f = np.shape(eigen[0])[0]
    for name, a in (("K", K), ("X", X)):
        if np.ndim(a) != 2 or np.shape(a)[0] != f:
            raise ValueError(f"{name} must be (F, m) with F = {f} (C0's size), got shape {tuple(np.shape(a))}")


@jax.jit
def _whiten(evals, evecs, a):
    """C0^-1/2 a in C0's eigenbasis: the C0^-1 metric becomes the Euclidean one."""
    return (evecs.astype(jnp.float64).T @ a.astype(jnp.float64)) / jnp.sqrt(evals.astype(jnp.float64))[:, None]


@jax.jit
def _span_fraction(evals, evecs, K, X, rcond):
    with jax.enable_x64(True):
        k, x = _whiten(evals, evecs, K), _whiten(evals, evecs, X)
        g = k.T @ k
        gl, gv = jnp.linalg.eigh(0.5 * (g + g.T))
        keep = gl > rcond * jnp.max(gl)
        basis = (k @ gv) / jnp.sqrt(jnp.where(keep, gl, 1.0))[None, :]   # orthonormal columns spanning K
        inside = jnp.sum(jnp.where(keep[:, None], basis.T @ x, 0.0) ** 2, axis=0)
        return inside / jnp.sum(x ** 2, axis=0)


@jax.jit
def _own_fraction(evals, evecs, K, X):
    with jax.enable_x64(True):
        k, x = _whiten(evals, evecs, K), _whiten(evals, evecs, X)
        return jnp.sum(k * x, axis=0) ** 2 / (jnp.sum(k ** 2, axis=0) * jnp.sum(x ** 2, axis=0))
