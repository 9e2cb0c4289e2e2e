"""ENCORE's norm constraint on the update: optimality conditions in float64 NumPy, and its plumbing."""
import numpy as np
import pytest

from jaxedit.editing import pm, preflight
from jaxedit.editing.editor import layer_update
from jaxedit.hparams import EditHparams

F, D, N = 24, 10, 5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((F, 3 * F))
    C0 = a @ a.T / a.shape[1] + 0.05 * np.eye(F)
    return C0, rng.standard_normal((F, N)), rng.standard_normal((D, N))


def _delta(method, C0, K, R, **kw):
    hp = EditHparams(method=method, layers=(1,), **kw)
    dw, _ = layer_update(hp, np.asarray(C0, np.float32), np.asarray(K, np.float32), np.asarray(R, np.float32))
    return np.asarray(dw, np.float64)


@pytest.mark.parametrize("lam,mu", [(2.0, 0.5), (100.0, 30.0)])
def test_memit_with_a_norm_constraint_zeroes_its_objectives_gradient(lam, mu):
    C0, K, R = _problem()
    dw = _delta("memit", C0, K, R, mom2_update_weight=lam, norm_constraint=mu)
    # d/d(dW) of ||dW K - R||^2 + lam tr(dW C0 dW^T) + mu ||dW||^2, halved
    grad = (dw @ K - R) @ K.T + lam * dw @ C0 + mu * dw
    scale = np.linalg.norm(R @ K.T)
    assert np.linalg.norm(grad) / scale < 1e-5
    # without the constraint the gradient of the constrained objective is not zero
    plain = _delta("memit", C0, K, R, mom2_update_weight=lam)
    assert np.linalg.norm((plain @ K - R) @ K.T + lam * plain @ C0 + mu * plain) / scale > 1e-2
    assert np.linalg.norm(dw) < np.linalg.norm(plain)


def test_emmet_with_a_norm_constraint_meets_its_kkt_conditions():
    C0, K, R = _problem(1)
    lam, mu = 5.0, 2.0
    dw = _delta("emmet", C0, K, R, mom2_update_weight=lam, emmet_lambda=0.0, norm_constraint=mu)
    # feasibility: dW K = R; stationarity: dW (lam C0 + mu I) lies in the span of K^T's rows
    assert np.linalg.norm(dw @ K - R) / np.linalg.norm(R) < 1e-5
    outside = np.eye(F) - K @ np.linalg.solve(K.T @ K, K.T)
    g = dw @ (lam * C0 + mu * np.eye(F))
    assert np.linalg.norm(g @ outside) / np.linalg.norm(g) < 1e-5
    # among all updates that write R, it is the one of least lam ||dW K0||^2 + mu ||dW||^2
    plain = _delta("emmet", C0, K, R, mom2_update_weight=lam, emmet_lambda=0.0)
    cost = lambda w: lam * np.trace(w @ C0 @ w.T) + mu * np.sum(w * w)
    assert cost(dw) < cost(plain) and np.linalg.norm(dw) < np.linalg.norm(plain)


def test_norm_shrinks_as_the_constraint_grows_and_alphaedit_adds_it_to_l2():
    C0, K, R = _problem(2)
    norms = [np.linalg.norm(_delta("memit", C0, K, R, mom2_update_weight=1.0, norm_constraint=mu))
             for mu in (0.0, 0.1, 1.0, 10.0)]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    got = _delta("alphaedit", C0, K, R, l2=1.0, norm_constraint=4.0, nullspace_threshold=0.5)
    want = _delta("alphaedit", C0, K, R, l2=5.0, nullspace_threshold=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_a_factor_made_with_another_shift_is_refused():
    C0, K, R = _problem(3)
    hp = EditHparams(method="memit", layers=(1,), mom2_update_weight=4.0, norm_constraint=2.0)
    assert hp.preservation_shift == 0.5
    good = pm.factor_preservation(np.asarray(C0, np.float32), shift=hp.preservation_shift)
    factors, _ = preflight.preservation_factors({1: good}, (1,), F, shift=hp.preservation_shift)
    assert float(factors[1].shift) == 0.5
    with pytest.raises(ValueError, match="made with shift 0; these hparams' norm constraint needs 0.5"):
        preflight.preservation_factors({1: pm.factor_preservation(np.asarray(C0, np.float32))}, (1,), F,
                                       shift=hp.preservation_shift)
    with pytest.raises(ValueError, match="norm_constraint"):
        EditHparams(method="memit", layers=(1,), norm_constraint=-1.0)
