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
