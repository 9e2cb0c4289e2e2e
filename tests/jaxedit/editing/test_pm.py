"""The PM solve against independent float64 NumPy implementations of the papers' closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.editing import pm

F, D = 64, 32


# ------------------------------------------------- independent float64 references (NumPy only)
def ref_rome(C0, W, k, v):
    """ROME (Meng et al. 2022, eq. 2): W' = W + (v - W k) (C0^-1 k)^T / ((C0^-1 k)^T k)."""
    u = np.linalg.solve(C0, k)
    return np.outer(v - W @ k, u) / (u @ k)


def ref_memit(C0, K, R, lam):
    """MEMIT (Meng et al. 2023, eq. 14): Delta = R K^T (lam C0 + K K^T)^-1."""
    return R @ K.T @ np.linalg.inv(lam * C0 + K @ K.T)


def ref_emmet(C0, K, R, lam, emmet_lambda):
    """EMMET (Gupta et al. 2024): Delta = R (K^T C^-1 K + e I)^-1 K^T C^-1 with C = lam C0."""
    Ci = np.linalg.inv(lam * C0)
    Dm = K.T @ Ci @ K + emmet_lambda * np.eye(K.shape[1])
    return R @ np.linalg.inv(Dm) @ K.T @ Ci


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def as32(*xs):
    """float32 copies, and the exact float64 values of those float32 numbers (the references' input)."""
    x32 = [np.asarray(x, np.float32) for x in xs]
    return x32, [x.astype(np.float64) for x in x32]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(F, 4 * F))
    C0 = A @ A.T / (4 * F) + 0.1 * np.eye(F)
    W = rng.normal(size=(D, F)) / np.sqrt(F)
    K = rng.normal(size=(F, 16)) + 0.5
    V = rng.normal(size=(D, 16))
    return C0, W, K, V


# ------------------------------------------------------------------------ closed forms
def test_rome_matches_reference_and_memorises(problem):
    C0, W, K, V = problem
    (c, w, k, v), (c64, w64, k64, v64) = as32(C0, W, K[:, 0], V[:, 0])
    dw, report = pm.rome_delta(jnp.asarray(c), jnp.asarray(w), jnp.asarray(k), jnp.asarray(v), return_report=True)
    assert dw.shape == (D, F) and dw.dtype == jnp.float32
    assert rel(dw, ref_rome(c64, w64, k64, v64)) <= 1e-6
    assert rel((w64 + np.asarray(dw, np.float64)) @ k64, v64) <= 1e-5
    assert bool(report.ok) and not bool(report.regularised)


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("lam", [0.5, 15000.0])
def test_memit_matches_reference(problem, n, lam):
    C0, _, K, V = problem
    (c, k, r), (c64, k64, r64) = as32(C0, K[:, :n], V[:, :n])
    dw = pm.memit_delta(jnp.asarray(c), jnp.asarray(k), jnp.asarray(r), lam)
    assert dw.shape == (D, F)
    assert rel(dw, ref_memit(c64, k64, r64, lam)) <= 1e-6


@pytest.mark.parametrize("n", [1, 4, 16])
def test_emmet_without_ridge_matches_reference_and_memorises(problem, n):
    C0, W, K, V = problem
    lam = 3.0
    (c, w, k, v), (c64, w64, k64, v64) = as32(C0, W, K[:, :n], V[:, :n])
    r64 = v64 - w64 @ k64
    dw = pm.emmet_delta(jnp.asarray(c), jnp.asarray(k), jnp.asarray(r64, jnp.float32), lam, 0.0)
    r64 = np.asarray(jnp.asarray(r64, jnp.float32), np.float64)
    assert rel(dw, ref_emmet(c64, k64, r64, lam, 0.0)) <= 1e-6
    # equality constraints: (W + dW) K = W K + R = V
    assert rel((w64 + np.asarray(dw, np.float64)) @ k64, w64 @ k64 + r64) <= 1e-5


def test_emmet_ridge_matches_reference(problem):
    C0, _, K, V = problem
    (c, k, r), (c64, k64, r64) = as32(C0, K[:, :8], V[:, :8])
    lam, e = 2.0, 0.1
    dw = pm.emmet_delta(jnp.asarray(c), jnp.asarray(k), jnp.asarray(r), lam, e)
    assert rel(dw, ref_emmet(c64, k64, r64, lam, e)) <= 1e-6
    # a single edit gets no EMMET ridge (as in the reference code): it is ROME
    one = pm.emmet_delta(jnp.asarray(c), jnp.asarray(k[:, :1]), jnp.asarray(r[:, :1]), lam, e)
    assert rel(one, ref_emmet(c64, k64[:, :1], r64[:, :1], lam, 0.0)) <= 1e-6


def test_memit_tends_to_unedited_weights_as_lambda_grows(problem):
    C0, _, K, V = problem
    factor = pm.factor_preservation(jnp.asarray(C0, jnp.float32))
    norms = [float(jnp.linalg.norm(pm.memit_delta(factor, jnp.asarray(K, jnp.float32), jnp.asarray(V, jnp.float32), lam)))
             for lam in (1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 1e-2 * norms[0]


def test_memit_ridge_form_equals_direct_form(problem):
    """The core with C = lam C0 and ridge 1 (the brief's form) equals memit_delta (ridge = lam on C0)."""
    C0, _, K, V = problem
    lam = 7.0
    (c, k, r), (c64, k64, r64) = as32(C0, K[:, :4], V[:, :4])
    scaled = pm.factor_preservation(jnp.asarray(lam * c64, jnp.float32))
    via_core, _ = pm.pm_delta(scaled, jnp.asarray(k), jnp.asarray(r), 1.0)
    direct = pm.memit_delta(jnp.asarray(c), jnp.asarray(k), jnp.asarray(r), lam)
    assert rel(via_core, direct) <= 1e-6
    assert rel(direct, ref_memit(c64, k64, r64, lam)) <= 1e-6


def test_spread_residual():
    t = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(pm.spread_residual(t, 0, 3), t / 3)
    np.testing.assert_allclose(pm.spread_residual(t, 2, 3), t)
    np.testing.assert_allclose(jax.jit(pm.spread_residual)(t, 1, 3), t / 2)
    with pytest.raises(ValueError, match="layer_position"):
        pm.spread_residual(t, 3, 3)


# ------------------------------------------------------------------------- jit and vmap
def test_vmap_over_lambda_equals_loop_and_jit_works(problem):
    C0, _, K, V = problem
    factor = pm.factor_preservation(jnp.asarray(C0, jnp.float32))
    k, r = jnp.asarray(K[:, :8], jnp.float32), jnp.asarray(V[:, :8], jnp.float32)
    lams = jnp.asarray([0.1, 1.0, 10.0, 1e3], jnp.float32)
    swept = jax.vmap(lambda lam: pm.memit_delta(factor, k, r, lam))(lams)
    looped = np.stack([np.asarray(pm.memit_delta(factor, k, r, float(lam))) for lam in lams])
    assert swept.shape == (4, D, F)
    np.testing.assert_allclose(swept, looped, rtol=1e-6, atol=1e-9)
    jitted = jax.jit(lambda c, k, r, lam: pm.memit_delta(c, k, r, lam))
    np.testing.assert_allclose(jitted(jnp.asarray(C0, jnp.float32), k, r, 1.0), looped[1], rtol=1e-5, atol=1e-8)
    reports = jax.vmap(lambda lam: pm.pm_delta(factor, k, r, lam)[1])(lams)
    assert reports.cond.shape == (4,) and np.all(np.diff(np.asarray(reports.cond)) < 0)


def test_float64_solve_composes_with_nested_transformations(problem):
    """vmap of an already-jitted caller re-traces the float64 body; it must stay float64."""
    C0, W, K, V = problem
    c = jnp.asarray(C0, jnp.float32)
    k, v, w = jnp.asarray(K[:, :4], jnp.float32), jnp.asarray(V[:, :4], jnp.float32), jnp.asarray(W, jnp.float32)
    lams = jnp.asarray([1.0, 10.0], jnp.float32)
    want = np.stack([np.asarray(pm.memit_delta(c, k, v, float(lam))) for lam in lams])
    got = jax.vmap(jax.jit(lambda lam: pm.memit_delta(c * 1.0, k, v, lam)))(lams)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    nested = jax.jit(jax.vmap(jax.jit(jax.vmap(lambda lam, kk: pm.memit_delta(c, kk, v, lam), (0, None))), (None, 0)))
    got = nested(lams, jnp.stack([k, k]))
    assert got.shape == (2, 2, D, F)
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-9)
    roms = jax.vmap(jax.jit(lambda kk, vv: pm.rome_delta(c, w, kk, vv)), in_axes=(1, 1))(k, v)
    np.testing.assert_allclose(roms[2], pm.rome_delta(c, w, k[:, 2], v[:, 2]), rtol=1e-5, atol=1e-9)


def test_mask_ignores_padding_columns(problem):
    C0, _, K, V = problem
    factor = pm.factor_preservation(jnp.asarray(C0, jnp.float32))
    k, r = jnp.asarray(K[:, :5], jnp.float32), jnp.asarray(V[:, :5], jnp.float32)
    padded_k = jnp.concatenate([k, jnp.zeros((F, 3)), ], axis=1)
    padded_r = jnp.concatenate([r, 7.0 * jnp.ones((D, 3))], axis=1)
    mask = jnp.arange(8) < 5
    for ridge in (0.0, 2.0):
        want, rep0 = pm.pm_delta(factor, k, r, ridge)
        got, rep = pm.pm_delta(factor, padded_k, padded_r, ridge, mask)
        assert rel(got, want) <= 1e-6
        assert not bool(rep.regularised)
        np.testing.assert_allclose(rep.cond, rep0.cond, rtol=1e-6)


# ---------------------------------------------------------------------- ill-conditioning
def test_duplicated_keys_are_reported_not_nan(problem):
    C0, _, K, V = problem
    k = np.concatenate([K[:, :3], K[:, :1]], axis=1).astype(np.float32)  # column 3 == column 0
    r = V[:, :4].astype(np.float32)
    r[:, 3] = r[:, 0]
    factor = pm.factor_preservation(jnp.asarray(C0, jnp.float32))
    dw, report = pm.pm_delta(factor, jnp.asarray(k), jnp.asarray(r), 0.0)
    assert np.all(np.isfinite(dw))
    assert bool(report.regularised) and float(report.ridge_added) > 0 and float(report.cond) > 1e10
    # consistent duplicates are still memorised
    assert rel(np.asarray(dw, np.float64) @ k.astype(np.float64), r) <= 1e-5
    with pytest.raises(ValueError, match="singular or ill-conditioned"):
        pm.checked_pm_delta(jnp.asarray(C0, jnp.float32), k, r, 0.0)
    # under jit, EMMET on the duplicated batch is finite and reported
    dw2, rep2 = jax.jit(lambda k, r: pm.emmet_delta(factor, k, r, 1.0, 0.0, return_report=True))(k, r)
    assert np.all(np.isfinite(dw2)) and bool(rep2.regularised)
    # the checked wrapper accepts a ridge that makes the system regular
    pm.checked_pm_delta(factor, k, r, 0.5)


def test_semidefinite_preservation_matrix_is_jittered_and_reported():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(F, F // 2))
    C = (A @ A.T).astype(np.float32)  # rank F/2
    factor = pm.factor_preservation(jnp.asarray(C))
    assert not bool(factor.positive_definite) and bool(factor.factored) and float(factor.jitter) > 0
    k, r = rng.normal(size=(F, 2)).astype(np.float32), rng.normal(size=(D, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="not positive definite"):
        pm.checked_pm_delta(jnp.asarray(C), k, r, 1.0)
    dw, _ = pm.checked_pm_delta(jnp.asarray(C), k, r, 1.0, allow_regularisation=True)
    assert np.all(np.isfinite(dw))
    # a hopeless matrix: no factor, dW = 0 and not ok (never NaN)
    bad = pm.factor_preservation(-jnp.eye(F))
    assert not bool(bad.factored)
    dw, report = pm.pm_delta(bad, jnp.asarray(k), jnp.asarray(r), 1.0)
    assert not bool(report.ok) and np.all(np.asarray(dw) == 0)


def test_wrong_shapes_raise_value_errors(problem):
    C0, W, K, V = problem
    c = jnp.asarray(C0, jnp.float32)
    k, r, w = K[:, :3].astype(np.float32), V[:, :3].astype(np.float32), W.astype(np.float32)
    with pytest.raises(ValueError, match=r"K have 63 rows.*\(64, 64\)"):
        pm.checked_pm_delta(c, k[:-1], r)
    with pytest.raises(ValueError, match=r"R \(32, 2\) have 2 columns but keys K \(64, 3\)"):
        pm.checked_pm_delta(c, k, r[:, :2])
    with pytest.raises(ValueError, match=r"W has shape \(32, 63\)"):
        pm.checked_pm_delta(c, k, r, W=w[:, :-1])
    with pytest.raises(ValueError, match=r"square"):
        pm.checked_pm_delta(c[:, :-1], k, r)
    with pytest.raises(ValueError, match=r"not symmetric"):
        pm.checked_pm_delta(c + jnp.triu(jnp.ones((F, F)), 1), k, r)
    with pytest.raises(ValueError, match=r"NaN"):
        pm.checked_pm_delta(c, np.where(k > 1, np.nan, k), r)
    with pytest.raises(ValueError, match=r"K have 63 rows"):  # also at trace time under jit
        jax.jit(lambda k: pm.memit_delta(c, k, r, 1.0))(k[:-1])
    with pytest.raises(ValueError, match=r"W has shape"):
        pm.rome_delta(c, w.T, k[:, 0], r[:, 0])


# --------------------------------------------------------------------------- accuracy
def test_float32_inputs_with_ill_conditioned_C_keep_float64_accuracy():
    """cond(C) ~ 1e6 in float32: the float64 factor keeps every editor at float64-level accuracy."""
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.normal(size=(F, F)))
    C = (Q * np.logspace(0, -6, F)) @ Q.T
    W = rng.normal(size=(D, F)) / np.sqrt(F)
    K = rng.normal(size=(F, 16))
    V = rng.normal(size=(D, 16))
    (c, w, k, v), (c64, w64, k64, v64) = as32(C, W, K, V)
    assert 1e5 < np.linalg.cond(c64) < 1e7
    factor = pm.factor_preservation(jnp.asarray(c))
    assert 1e5 < float(factor.cond) < 1e7
    r64 = v64 - w64 @ k64
    r = r64.astype(np.float32)
    r64 = r.astype(np.float64)
    assert rel(pm.rome_delta(factor, jnp.asarray(w), jnp.asarray(k[:, 0]), jnp.asarray(v[:, 0])),
               ref_rome(c64, w64, k64[:, 0], v64[:, 0])) <= 1e-6
    for n in (4, 16):
        assert rel(pm.memit_delta(factor, jnp.asarray(k[:, :n]), jnp.asarray(r[:, :n]), 1e-3),
                   ref_memit(c64, k64[:, :n], r64[:, :n], 1e-3)) <= 1e-6
        dw = pm.emmet_delta(factor, jnp.asarray(k[:, :n]), jnp.asarray(r[:, :n]), 1.0, 0.0)
        assert rel(dw, ref_emmet(c64, k64[:, :n], r64[:, :n], 1.0, 0.0)) <= 1e-6
        assert rel(np.asarray(dw, np.float64) @ k64[:, :n], r64[:, :n]) <= 1e-5
