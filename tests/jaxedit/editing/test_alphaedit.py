"""AlphaEdit's null-space update against an independent float64 NumPy implementation of the
reference code's formula, its guarantees, the cached eigendecomposition, and its refusals."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.editing import editor, null_space, pm, preflight
from jaxedit.hparams import EditHparams

F, D = 40, 12


def covariance(rng, decay=0.25):
    """An uncentred covariance whose spectrum spans 1 .. 1e-5, so a threshold cuts it."""
    q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    evals = np.logspace(0, -5, F)
    return (q * evals) @ q.T


def reference_delta(C0, K, R, Kp, threshold, l2):
    """The reference code's update in NumPy float64: P = U U^T over C0's eigenvectors with eigenvalue
    < threshold; dW^T = solve(P (K K^T + Kp Kp^T) + l2 I, P K R^T)."""
    evals, evecs = np.linalg.eigh(C0)
    u = evecs[:, evals < threshold]
    p = u @ u.T
    a = p @ (K @ K.T + Kp @ Kp.T) + l2 * np.eye(F)
    return np.linalg.solve(a, p @ K @ R.T).T, p


@pytest.mark.parametrize("threshold,l2,m", [(1e-2, 10.0, 7), (1e-3, 0.5, 0), (0.5, 1e-3, 3)])
def test_alphaedit_equals_numpy_reference(threshold, l2, m):
    rng = np.random.default_rng(0)
    C0 = covariance(rng)
    K, R, Kp = rng.standard_normal((F, 5)), rng.standard_normal((D, 5)), rng.standard_normal((F, m))
    want, p = reference_delta(C0, K, R, Kp, threshold, l2)
    space = pm.null_space(C0, threshold)  # NumPy float64 inputs stay float64 inside
    got, report = pm.alphaedit_delta(space, K, R, l2, previous_keys=Kp if m else None)
    got = np.asarray(got, np.float64)  # dW comes back as float32
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want) + 1e-6, np.linalg.norm(got - want)
    assert bool(report.ok) and np.isfinite(float(report.cond)) and float(report.cond) >= 1
    # the update lives in the null space: it leaves the preserved directions untouched ...
    assert np.linalg.norm(got @ (np.eye(F) - p)) <= 1e-6 * np.linalg.norm(got)
    # ... so the keys C0 summarises move by at most the threshold: ||dW C0|| <= threshold ||dW||
    assert np.linalg.norm(got @ C0) <= threshold * np.linalg.norm(got) * (1 + 1e-6)


def test_alphaedit_is_the_restricted_least_squares_solution():
    rng = np.random.default_rng(1)
    C0 = covariance(rng)
    K, R, Kp = rng.standard_normal((F, 4)), rng.standard_normal((D, 4)), rng.standard_normal((F, 6))
    space = pm.null_space(jnp.asarray(C0), 1e-2)
    dw = np.asarray(pm.alphaedit_delta(space, K, R, 2.0, previous_keys=Kp)[0], np.float64)
    # the gradient of ||dW K - R||^2 + ||dW Kp||^2 + l2 ||dW||^2, projected on the null space, is 0
    grad = (dw @ K - R) @ K.T + dw @ Kp @ Kp.T + 2.0 * dw
    p = np.asarray(space.eigenvectors)[:, np.asarray(space.null)]
    assert np.linalg.norm(grad @ p) <= 1e-5 * np.linalg.norm(R @ K.T @ p)
    # earlier keys are kept: a larger K_p moves them less
    big = np.asarray(pm.alphaedit_delta(space, K, R, 2.0, previous_keys=10 * Kp)[0], np.float64)
    assert np.linalg.norm(big @ Kp) < np.linalg.norm(dw @ Kp)


def test_threshold_recut_and_bad_inputs():
    rng = np.random.default_rng(2)
    C0 = jnp.asarray(covariance(rng))
    space = pm.null_space(C0, 1e-2)
    recut = space.with_threshold(1e-4)
    assert recut.rank == pm.null_space(C0, 1e-4).rank < space.rank
    with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
        pm.null_space(C0, 0.0)
    with pytest.raises(ValueError, match="previous keys must be a"):
        pm.alphaedit_delta(space, jnp.ones((F, 2)), jnp.ones((D, 2)), 1.0, previous_keys=jnp.ones((F + 1, 2)))
    with pytest.raises(ValueError, match="keys K have"):
        pm.alphaedit_delta(space, jnp.ones((F + 1, 2)), jnp.ones((D, 2)), 1.0)
    with pytest.raises(ValueError, match="no eigenvalue of C0 is below"):
        preflight.null_spaces({3: C0}, [3], F, 1e-9)
    spaces, warnings = preflight.null_spaces({3: C0}, [3], F, 10.0)
    assert spaces[3].rank == F and "preserves nothing" in warnings[0]
    with pytest.raises(ValueError, match="l2 must be a finite number > 0"):
        EditHparams(method="alphaedit", layers=(1,), l2=0.0)
    with pytest.raises(ValueError, match="nullspace_threshold must be"):
        EditHparams(method="alphaedit", layers=(1,), nullspace_threshold=-1.0)


def test_eigendecomposition_cache(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(3)
    C0 = covariance(rng).astype(np.float32)
    first = null_space.preservation_null_spaces({5: C0}, 1e-2, cache_dir=tmp_path)[5]
    files = list(tmp_path.glob("eigh_*.npz"))
    assert len(files) == 1

    def no_eigh(c):
        raise AssertionError("recomputed instead of read from the cache")
    monkeypatch.setattr(pm, "eigen_preservation", no_eigh)
    again = null_space.preservation_null_spaces({5: C0}, 1e-3, cache_dir=tmp_path)[5]
    np.testing.assert_array_equal(np.asarray(again.eigenvectors), np.asarray(first.eigenvectors))
    assert again.rank < first.rank  # another threshold, cut from the same eigendecomposition
    with pytest.raises(AssertionError, match="recomputed"):  # another C0 never uses this file
        null_space.preservation_null_spaces({5: C0 * 2}, 1e-2, cache_dir=tmp_path)
    monkeypatch.undo()
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        fixed = null_space.preservation_null_spaces({5: C0}, 1e-2, cache_dir=tmp_path)[5]
    assert "ignoring the cached eigendecomposition" in caplog.text
    np.testing.assert_allclose(np.asarray(fixed.eigenvalues), np.asarray(first.eigenvalues), rtol=1e-12)


def test_previous_keys_only_for_alphaedit(tiny_with_tokenizer, tiny_covariance):
    cfg, params, tok = tiny_with_tokenizer
    from jaxedit.requests import EditRequest
    req = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0)]
    hp = EditHparams(method="memit", layers=(1,))
    with pytest.raises(ValueError, match="MEMIT does not take previous_keys"):
        editor.edit(params, cfg, tok, req, hp, covariances={1: tiny_covariance}, templates=(("{}",),),
                    previous_keys={1: jnp.ones((cfg.intermediate_size, 2))})
    hp = EditHparams(method="alphaedit", layers=(1,), nullspace_threshold=1.0)
    with pytest.raises(ValueError, match="previous_keys of layer 1 must be"):
        editor.edit(params, cfg, tok, req, hp, covariances={1: tiny_covariance}, templates=(("{}",),),
                    previous_keys={1: jnp.ones((3, 2))})


def test_alphaedit_spreads_over_layers_like_memit(tiny_with_tokenizer, tiny_covariance):
    """Several layers: each gets its share of the residual (spread_residual), projected on its own
    null space; the other layers and the input tree stay as they were."""
    cfg, params, tok = tiny_with_tokenizer
    from jaxedit.requests import EditRequest
    from jaxedit.hparams import ValueHparams
    reqs = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
            EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1)]
    evals = np.linalg.eigvalsh(np.asarray(tiny_covariance, np.float64))
    threshold = float(np.median(evals))  # half the directions are free
    hp = EditHparams(method="alphaedit", layers=(0, 1), nullspace_threshold=threshold, l2=0.1,
                     value=ValueHparams(v_num_grad_steps=3))
    before = np.array(params["layers"]["down_proj"])
    new, report = editor.edit(params, cfg, tok, reqs, hp, covariances={0: tiny_covariance, 1: tiny_covariance},
                              templates=(("{}",),))
    after = np.asarray(new["layers"]["down_proj"])
    np.testing.assert_array_equal(np.asarray(params["layers"]["down_proj"]), before)
    assert len(report.solves) == 2 and all(bool(s.ok) for s in report.solves)
    space = pm.null_space(np.asarray(tiny_covariance, np.float64), threshold)
    p = np.asarray(space.eigenvectors)[:, np.asarray(space.null)]
    for layer in (0, 1):
        dw = (after[layer] - before[layer]).astype(np.float64)
        assert np.linalg.norm(dw) > 0
        # in the null space (float32 weights: rounding of W + dW bounds the leak)
        assert np.linalg.norm(dw - dw @ p @ p.T) <= 1e-3 * np.linalg.norm(dw)
    np.testing.assert_array_equal(after[2:], before[2:])
