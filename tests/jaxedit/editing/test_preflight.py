"""Never wrong in silence: values, templates and C0 are checked before the value optimisation, what
is repaired is reported, and an update out of proportion to its layer is flagged."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.editing import editor, preflight
from jaxedit.hparams import CovarianceHparams, EditHparams, ValueHparams
from jaxedit.requests import EditRequest

GROUPS = (("{}",), ("Once upon a time. {}", "Because of that, {}"))
REQUESTS = (
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
    EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1),
)
FAST = ValueHparams(v_num_grad_steps=3)


def hp(method="memit", layers=(1,), **kw):
    return EditHparams(method=method, layers=layers, value=FAST, **kw)


@pytest.fixture(scope="module")
def setup(tiny_with_tokenizer, tiny_covariance):
    cfg, params, tok = tiny_with_tokenizer
    C0 = tiny_covariance
    values = editor.edit_values(params, cfg, tok, REQUESTS, hp(), templates=GROUPS)
    return cfg, params, tok, {0: C0, 1: C0, 2: C0}, values


@pytest.fixture
def no_value_loop(monkeypatch):
    """Fails the test if the value optimisation starts: the checks must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the value optimisation ran before the cheap checks")
    monkeypatch.setattr(editor, "compute_values", refuse)


# ------------------------------------------------------------------------------ values identity
def test_values_know_what_they_were_made_for(setup):
    cfg, params, tok, covs, values = setup
    made = values.made_for
    assert made.layer == 1 and made.site == "resid" and len(made.requests) == 2
    one = values.select(1)
    assert one.made_for.requests == (made.requests[1],) and one.target.shape == (1, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(one.target[0]), np.asarray(values.target[1]))
    new, _ = editor.edit(params, cfg, tok, REQUESTS[1:], hp(), covariances=covs, templates=GROUPS, values=one)
    assert not np.array_equal(np.asarray(new["layers"]["down_proj"][1]), np.asarray(params["layers"]["down_proj"][1]))


@pytest.mark.parametrize("case, match", [
    ("other layer", "layer 1 instead of 2"),
    ("other site", "site 'resid' instead of 'mlp'"),
    ("other requests", r"other requests at position\(s\) \[1\]"),
    ("other model", "another model"),
    ("no identity", "carry no identity"),
    ("wrong width", "width"),
])
def test_values_made_for_another_edit_are_refused(setup, no_value_loop, case, match):
    cfg, params, tok, covs, values = setup
    h, requests, model = hp(), REQUESTS, params
    if case == "other layer":
        h = hp(layers=(2,))
    elif case == "other site":
        h, requests, values = hp("rome"), REQUESTS[:1], values.select(0)
    elif case == "other requests":
        requests = (REQUESTS[0], EditRequest("{} is a twin city of", "Lyon", "Paris", case_id=1))
    elif case == "other model":
        layers = dict(params["layers"])
        layers["up_proj"] = layers["up_proj"].at[0, 0, 0].add(1.0)
        model = {**params, "layers": layers}
    elif case == "no identity":
        values = values.replace(made_for=None)
    elif case == "wrong width":
        values = values.replace(target=values.target[:, :-1])
    with pytest.raises(ValueError, match=match):
        editor.edit(model, cfg, tok, requests, h, covariances=covs, templates=GROUPS, values=values)


# ----------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("groups, match", [
    ((("Once upon a time. {}",), ("{}",)), "first context template group must be the bare"),
    ((), "non-empty sequence of template groups"),
    ((("{}",), ()), "group 1 must be a non-empty sequence"),
    ((("{}",), ("no placeholder",)), "exactly one"),
    ("{}", "non-empty sequence of template groups"),
])
def test_bad_templates_are_refused_first(setup, no_value_loop, groups, match):
    cfg, params, tok, covs, _ = setup
    with pytest.raises(ValueError, match=match):
        editor.edit(params, cfg, tok, REQUESTS, hp(), covariances=covs, templates=groups)
    with pytest.raises(ValueError, match=match):
        editor.edit_values(params, cfg, tok, REQUESTS, hp(), templates=groups)


# ------------------------------------------------------------------------------------------ C0
def test_zero_nan_and_misshapen_c0_are_refused_before_values(setup, no_value_loop):
    cfg, params, tok, covs, _ = setup
    f = cfg.intermediate_size
    bad = {
        "all zeros": jnp.zeros((f, f)),
        "NaN or inf": covs[1].at[0, 0].set(jnp.nan),
        r"shape \(3, 3\)": jnp.eye(3),
    }
    for match, c in bad.items():
        with pytest.raises(ValueError, match=match):
            editor.edit(params, cfg, tok, REQUESTS, hp(), covariances={1: c}, templates=GROUPS)


def test_rank_deficient_c0_is_refused_or_regularised_and_reported(setup, caplog):
    cfg, params, tok, _, values = setup
    f = cfg.intermediate_size
    k = np.random.RandomState(1).randn(f, f // 4).astype(np.float32)  # fewer "tokens" than F
    C0 = jnp.asarray(k @ k.T / k.shape[1])
    with pytest.raises(ValueError, match="fewer corpus tokens than its size.*allow_jitter"):
        editor.edit(params, cfg, tok, REQUESTS, hp(), covariances={1: C0}, templates=GROUPS, values=values)
    with caplog.at_level(logging.WARNING):
        new, report = editor.edit(params, cfg, tok, REQUESTS, hp(), covariances={1: C0}, templates=GROUPS,
                                  values=values, allow_jitter=True)
    assert len(report.repairs) == 1 and "not positive definite" in report.repairs[0]
    assert "not positive definite" in caplog.text and "repaired:" in report.summary()
    assert np.all(np.isfinite(np.asarray(new["layers"]["down_proj"])))


def test_smollm2_c0_from_few_tokens_factors_with_reported_jitter(smollm2, data_dir):
    """A float32 C0 of 128 tokens for F = 1536 has rounding eigenvalues below zero; the jitter covers them."""
    from jaxedit.editing import covariance

    cfg, params, tok = smollm2
    spec = CovarianceHparams(corpus="wikitext-103-valid.tokens", n_samples=2, max_length=64, batch_size=2)
    C0 = covariance.preservation_covariance(params, cfg, tok, [3], spec, data_dir=data_dir, progress=False)
    factors, repairs = preflight.preservation_factors(C0, [3], cfg.intermediate_size, allow_jitter=True)
    assert bool(factors[3].factored) and len(repairs) == 1
    with pytest.raises(ValueError, match="not positive definite"):
        preflight.preservation_factors(C0, [3], cfg.intermediate_size)


# ----------------------------------------------------------------------------- update norm
def test_update_out_of_proportion_is_flagged(setup, caplog):
    cfg, params, tok, covs, values = setup
    huge = values.replace(target=values.target * 1e4)  # same identity, absurd targets
    with caplog.at_level(logging.WARNING):
        _, report = editor.edit(params, cfg, tok, REQUESTS, hp(emmet_lambda=0.0, method="emmet"),
                                covariances=covs, templates=GROUPS, values=huge)
    assert len(report.warnings) == 1 and "exceeds sqrt(2) x the layer's own" in report.warnings[0]
    assert "overwrites the layer" in caplog.text and "WARNING" in report.summary()
    _, fine = editor.edit(params, cfg, tok, REQUESTS, hp(), covariances=covs, templates=GROUPS, values=values)
    assert fine.warnings == () and fine.repairs == ()
    assert preflight.check_update_norm(0, 1.0, 2.0) is None
    # the rule scales with the batch: 3.9 x ||W|| is usual for 16 requests, not for 4
    assert preflight.check_update_norm(0, 3.9, 1.0, n_requests=16) is None
    assert "sqrt(4)" in preflight.check_update_norm(0, 3.9, 1.0, n_requests=4)


# ------------------------------------------------------------------------------------- hparams
@pytest.mark.parametrize("make, match", [
    (lambda: EditHparams(method="memit", layers=(1,), mom2_update_weight=-1.0), "mom2_update_weight must be a finite number > 0"),
    (lambda: EditHparams(method="emmet", layers=(1,), emmet_lambda=-0.1), "emmet_lambda must be a finite number >= 0"),
    (lambda: ValueHparams(kl_factor=-0.1), "kl_factor must be a finite number >= 0"),
    (lambda: ValueHparams(v_lr=float("nan")), "v_lr must be a finite number > 0"),
    (lambda: EditHparams(method="memit", layers=(1.5,)), "layers must be an integer >= 0"),
    (lambda: EditHparams(method="memit", layers=(-1,)), "layers must be an integer >= 0"),
    (lambda: ValueHparams(v_num_grad_steps=2.5), "v_num_grad_steps must be an integer >= 1"),
    (lambda: CovarianceHparams(n_samples=0), "n_samples must be an integer >= 1"),
])
def test_bad_hparams_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_integer_layers_are_accepted():
    assert EditHparams(method="memit", layers=(np.int64(3),)).layers == (3,)
