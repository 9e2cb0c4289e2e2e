"""The PyTorch reference's solves against the papers' closed forms in float64 NumPy."""
import numpy as np


def test_baseline_solves_match_the_papers_formulas():
    from baselines import torch_reference as tb

    rng = np.random.default_rng(0)
    f, d, n = 12, 5, 3
    a = rng.normal(size=(f, 40))
    C0, K, R = a @ a.T / 40, rng.normal(size=(f, n)), rng.normal(size=(d, n))
    lam = 7.0
    memit = R @ K.T @ np.linalg.inv(lam * C0 + K @ K.T)
    np.testing.assert_allclose(tb.memit_solve(C0, K, R, lam).numpy(), memit, rtol=1e-10, atol=1e-12)
    Ci = np.linalg.inv(lam * C0)
    emmet = R @ np.linalg.inv(K.T @ Ci @ K + 0.1 * np.eye(n)) @ K.T @ Ci
    np.testing.assert_allclose(tb.emmet_solve(C0, K, R, lam, 0.1).numpy(), emmet, rtol=1e-10, atol=1e-12)
    # one edit: no ridge, (W + dW) k = W k + r exactly
    dw = tb.emmet_solve(C0, K[:, :1], R[:, :1], lam, 0.1).numpy()
    np.testing.assert_allclose(dw @ K[:, 0], R[:, 0], rtol=1e-10)


def test_baseline_rome_and_alphaedit_solves_match_the_papers_formulas():
    from baselines import torch_reference as tb

    rng = np.random.default_rng(1)
    f, d, n = 12, 5, 3
    a = rng.normal(size=(f, 6))  # rank 6 < 12: a null space
    C0 = a @ a.T / 6 + 1e-4 * np.eye(f)
    K, R = rng.normal(size=(f, n)), rng.normal(size=(d, n))
    # ROME: dW = r (C0^-1 k)^T / (k^T C0^-1 k), so dW k = r exactly
    k, r = K[:, 0], R[:, 0]
    u = np.linalg.solve(C0, k)
    dw = tb.rome_solve(C0, k, r).numpy()
    np.testing.assert_allclose(dw, np.outer(r, u) / (k @ u), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw @ k, r, rtol=1e-10)
    # AlphaEdit (Fang et al. 2025): dW = R K^T P (K K^T P + K_p K_p^T P + l2 I)^-1
    evals, evecs = np.linalg.eigh(C0)
    null = evecs[:, evals < 1e-2]
    assert null.shape[1] == f - 6
    P = null @ null.T
    Kp, l2 = rng.normal(size=(f, 2)), 0.5
    want = R @ K.T @ P @ np.linalg.inv(K @ K.T @ P + Kp @ Kp.T @ P + l2 * np.eye(f))
    got = tb.alphaedit_solve(C0, K, R, 1e-2, l2, previous_keys=Kp).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got @ evecs[:, evals >= 1e-2], 0, atol=1e-10)  # nothing outside the null space
