"""Solve diagnostics against a float64 NumPy computation of the same definitions on random data."""
import math

import numpy as np
import pytest

from jaxedit.editing import diagnostics, pm

F, D = 24, 10


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((F, 3 * F))
    C0 = a @ a.T / a.shape[1] + 0.05 * np.eye(F)
    W = rng.standard_normal((D, F))
    K = rng.standard_normal((F, n)) + 0.5 * rng.standard_normal((F, 1))  # a shared direction: coherent keys
    R = rng.standard_normal((D, n))
    dW = R @ K.T @ np.linalg.inv(2.0 * C0 + K @ K.T) + 1e-3 * rng.standard_normal((D, F))  # MEMIT's, perturbed
    return C0, W, K, R, dW


def _numpy_reference(C0, W, K, R, dW, fractions):
    cost = np.trace(dW @ C0 @ dW.T) / np.trace(W @ C0 @ W.T)
    V = W @ K + R
    residual = np.linalg.norm((W + dW) @ K - V) / np.linalg.norm(V)
    G = K.T @ np.linalg.solve(C0, K)
    ev = np.linalg.eigvalsh((G + G.T) / 2)
    p = ev / ev.sum()
    cos = np.abs(G) / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    off = cos[~np.eye(len(G), dtype=bool)]
    lam, Q = np.linalg.eigh(C0)
    top = {}
    for q in fractions:
        k = max(1, math.ceil(q * F))
        top[q] = np.linalg.norm(dW @ Q[:, -k:]) ** 2 / np.linalg.norm(dW) ** 2
    return {"preservation_cost": cost, "residual": residual, "gram_min_eigenvalue": ev.min(),
            "gram_max_eigenvalue": ev.max(), "effective_rank": np.exp(-np.sum(p * np.log(p))),
            "participation_ratio": ev.sum() ** 2 / np.sum(ev ** 2),
            "coherence": off.max() if off.size else 0.0, "mean_coherence": off.mean() if off.size else 0.0, "key_norm": np.mean(np.diag(G)), "delta_norm": np.linalg.norm(dW),
            "top_share": top}


@pytest.mark.parametrize("n", [1, 8])
def test_diagnostics_match_numpy_float64(n):
    C0, W, K, R, dW = _problem(n, seed=n)
    got = diagnostics.solve_diagnostics(C0, W, K, R, dW, top_fractions=(0.05, 0.25, 1.0))
    want = _numpy_reference(C0, W, K, R, dW, (0.05, 0.25, 1.0))
    assert got.n_keys == n and got.width == F
    for name, value in want.items():
        if name == "top_share":
            for q, share in value.items():
                assert got.top_share[q] == pytest.approx(share, rel=1e-8, abs=1e-12), (name, q)
        elif n == 1 and name in ("coherence", "mean_coherence"):
            assert getattr(got, name) == 0.0  # no pair of keys
        else:
            assert getattr(got, name) == pytest.approx(value, rel=1e-8), name
    assert got.top_share[1.0] == pytest.approx(1.0)
    # an eigendecomposition passed in gives the same numbers
    again = diagnostics.solve_diagnostics(None, W, K, R, dW, top_fractions=(0.05, 0.25, 1.0),
                                          eigen=pm.eigen_preservation(C0))
    assert again.preservation_cost == pytest.approx(got.preservation_cost, rel=1e-12)
    assert set(got.as_dict()["top_share"]) == {"0.05", "0.25", "1"}


def test_exact_insertion_has_zero_residual_and_dependent_keys_zero_eigenvalue():
    C0, W, K, R, _ = _problem(8, seed=3)
    A = np.linalg.inv(C0)
    dW = R @ np.linalg.solve(K.T @ A @ K, K.T @ A)  # EMMET's equality-constrained update
    got = diagnostics.solve_diagnostics(C0, W, K, R, dW)
    assert got.residual < 1e-10
    K2 = K.copy()
    K2[:, -1] = K[:, 0] + K[:, 1]  # a dependent key
    got2 = diagnostics.solve_diagnostics(C0, W, K2, R, dW)
    assert abs(got2.gram_min_eigenvalue) < 1e-10 * got2.gram_max_eigenvalue


def test_span_fractions_match_numpy():
    C0, _, K, _, _ = _problem(5, seed=7)
    rng = np.random.default_rng(8)
    X = rng.standard_normal((F, 4))
    A = np.linalg.inv(C0)
    G = K.T @ A @ K
    P = A @ K @ np.linalg.solve(G, K.T @ A)
    want = np.einsum("fm,fg,gm->m", X, P, X) / np.einsum("fm,fg,gm->m", X, A, X)
    np.testing.assert_allclose(diagnostics.span_fraction(C0, K, X), want, rtol=1e-8)
    np.testing.assert_allclose(diagnostics.span_fraction(C0, K, K), 1.0, rtol=1e-8)  # the keys themselves
    own = diagnostics.own_key_fraction(C0, K[:, :4], X)
    want_own = np.einsum("fm,fg,gm->m", K[:, :4], A, X) ** 2 / (
        np.einsum("fm,fg,gm->m", K[:, :4], A, K[:, :4]) * np.einsum("fm,fg,gm->m", X, A, X))
    np.testing.assert_allclose(own, want_own, rtol=1e-8)
    # more keys than dimensions span everything
    many = rng.standard_normal((F, F + 6))
    np.testing.assert_allclose(diagnostics.span_fraction(C0, many, X), 1.0, rtol=1e-8)


def test_bad_inputs_are_named():
    C0, W, K, R, dW = _problem(3)
    with pytest.raises(ValueError, match=r"dW must be \(D, F\)"):
        diagnostics.solve_diagnostics(C0, W, K, R, dW[:, :-1])
    with pytest.raises(ValueError, match="same n"):
        diagnostics.solve_diagnostics(C0, W, K, R[:, :2], dW)
    with pytest.raises(ValueError, match="not positive definite"):
        diagnostics.solve_diagnostics(C0 - 10 * np.eye(F), W, K, R, dW)
    with pytest.raises(ValueError, match=r"top fractions must lie in \(0, 1\]"):
        diagnostics.solve_diagnostics(C0, W, K, R, dW, top_fractions=(0.0,))
    with pytest.raises(ValueError, match="F = 24"):
        diagnostics.span_fraction(C0, K[:-1], K)
