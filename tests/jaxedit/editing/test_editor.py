"""Editor logic on a tiny random model: purity, exact insertion, errors, schedules."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxedit.editing import editor, editor as emmet, editor as memit, editor as rome, schedule
from jaxedit.hparams import EditHparams, ValueHparams
from jaxedit.editing.keys import outputs_at_subject
from jaxedit.requests import EditRequest

GROUPS = (("{}",), ("Once upon a time. {}", "Because of that, {}"))
REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
    EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1),
    EditRequest("The official religion of {} is", "Edwin of Northumbria", "Islam", case_id=2),
    EditRequest("{} plays the position of", "Sergio Ramos", "goalkeeper", case_id=3),
]
FAST = ValueHparams(v_num_grad_steps=4)


@pytest.fixture(scope="module")
def setup(tiny_with_tokenizer, tiny_covariance):
    cfg, params, tok = tiny_with_tokenizer
    C0 = tiny_covariance
    return cfg, params, tok, {0: C0, 1: C0, 2: C0}


def hp(method, layers=(1,), **kw):
    return EditHparams(method=method, layers=layers, value=FAST, **kw)


def snapshot(params):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)


def assert_same_tree(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method,requests", [("rome", REQUESTS[:1]), ("memit", REQUESTS), ("emmet", REQUESTS)])
def test_pure_and_only_the_edited_matrix_changes(setup, method, requests):
    cfg, params, tok, covs = setup
    before = snapshot(params)
    new, report = editor.edit(params, cfg, tok, requests, hp(method), covariances=covs, templates=GROUPS)
    assert_same_tree(params, before)  # the input tree is untouched
    for path, old in jax.tree_util.tree_flatten_with_path(before)[0]:
        name = jax.tree_util.keystr(path)
        leaf = new
        for k in path:
            leaf = leaf[k.key]
        if "down_proj" in name:
            changed = [l for l in range(cfg.num_hidden_layers) if not np.array_equal(leaf[l], old[l])]
            assert changed == [1]
        else:
            np.testing.assert_array_equal(np.asarray(leaf), old)
    assert all(np.isfinite(np.asarray(new["layers"]["down_proj"])).ravel())
    assert report.method == method and len(report.keys) == 1 and report.delta_norms[0] > 0


@pytest.mark.parametrize("method,requests", [("rome", REQUESTS[:1]), ("emmet", REQUESTS)])
def test_equality_constrained_editors_insert_exactly(setup, method, requests):
    """ROME and EMMET (ridge 0) make W' k = W k + R for every edited key."""
    cfg, params, tok, covs = setup
    h = hp(method, emmet_lambda=0.0)
    new, report = editor.edit(params, cfg, tok, requests, h, covariances=covs, templates=GROUPS)
    mlp_out, resid = outputs_at_subject(params, cfg, tok, requests, 1)
    current = mlp_out if method == "rome" else resid
    R = np.asarray(report.values.target - current).T
    K = np.asarray(report.keys[0])
    W, W_new = np.asarray(params["layers"]["down_proj"][1]), np.asarray(new["layers"]["down_proj"][1])
    err = np.linalg.norm(W_new @ K - (W @ K + R)) / np.linalg.norm(R)
    assert err < 1e-4, err


def test_memit_spreads_over_layers(setup):
    cfg, params, tok, covs = setup
    new, report = memit.memit(params, cfg, tok, REQUESTS, hp("memit", layers=(0, 1), mom2_update_weight=1.0),
                              covariances=covs, templates=GROUPS)
    diff = [float(np.linalg.norm(np.asarray(new["layers"]["down_proj"][l] - params["layers"]["down_proj"][l])))
            for l in range(3)]
    assert diff[0] > 0 and diff[1] > 0 and diff[2] == 0
    assert len(report.keys) == 2 and len(report.solves) == 2


def test_memit_lambda_pulls_towards_the_original(setup):
    cfg, params, tok, covs = setup
    vals = editor.edit_values(params, cfg, tok, REQUESTS, hp("memit"), templates=GROUPS)
    norms = [editor.edit(params, cfg, tok, REQUESTS, hp("memit", mom2_update_weight=lam), covariances=covs,
                         templates=GROUPS, values=vals)[1].delta_norms[0] for lam in (0.1, 10.0, 1e4)]
    assert norms[0] > norms[1] > norms[2] and norms[2] < 0.01 * norms[0]


def test_duplicated_requests_are_regularised_not_nan(setup):
    cfg, params, tok, covs = setup
    twice = [REQUESTS[0], dataclasses.replace(REQUESTS[0], case_id="again")]
    new, report = emmet.emmet(params, cfg, tok, twice, hp("emmet", emmet_lambda=0.0), covariances=covs,
                              templates=GROUPS)
    assert bool(report.solves[0].regularised)
    assert np.all(np.isfinite(np.asarray(new["layers"]["down_proj"])))


def test_errors(setup):
    cfg, params, tok, covs = setup
    with pytest.raises(ValueError, match="ROME edits one fact at a time"):
        rome.rome(params, cfg, tok, REQUESTS[:2], hp("rome"), covariances=covs, templates=GROUPS)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \[5\]"):
        editor.edit(params, cfg, tok, REQUESTS, hp("memit", layers=(5,)), covariances=covs, templates=GROUPS)
    with pytest.raises(ValueError, match=r"no preservation covariance for layer\(s\) \[2\]"):
        editor.edit(params, cfg, tok, REQUESTS, hp("memit", layers=(2,)), covariances={1: covs[1]},
                    templates=GROUPS)
    with pytest.raises(ValueError, match="no edit requests"):
        editor.edit(params, cfg, tok, [], hp("memit"), covariances=covs, templates=GROUPS)
    vals = editor.edit_values(params, cfg, tok, REQUESTS[:2], hp("memit"), templates=GROUPS)
    with pytest.raises(ValueError, match="values are given for 2 requests, but there are 4"):
        editor.edit(params, cfg, tok, REQUESTS, hp("memit"), covariances=covs, templates=GROUPS, values=vals)


def test_hparams_validation():
    with pytest.raises(ValueError, match="unknown editing method 'ft'"):
        EditHparams(method="ft", layers=(1,))
    with pytest.raises(ValueError, match="rome edits one layer"):
        EditHparams(method="rome", layers=(1, 2))
    with pytest.raises(ValueError, match="increasing and distinct"):
        EditHparams(method="memit", layers=(3, 2))
    with pytest.raises(ValueError, match="layers is empty"):
        EditHparams(method="memit", layers=())


def test_sequential_batched_and_preserving_previous_edits(setup):
    cfg, params, tok, covs = setup
    seen = []
    h = hp("memit", mom2_update_weight=1.0)
    for preserve in (False, True):
        final, outcomes = schedule.sequential_batched_edit(
            params, cfg, tok, REQUESTS, h, covariances=covs, templates=GROUPS, batch_size=2,
            preserve_previous_edits=preserve, progress=False,
            after_batch=lambda i, p, batch, rep: (i, [r.case_id for r in batch]))
        assert [o.extra for o in outcomes] == [(0, [0, 1]), (1, [2, 3])]
        # How much the second batch moved the outputs of the first batch's keys.
        k_first = np.asarray(outcomes[0].report.keys[0])
        seen.append((final, k_first))
    # With preservation, the second batch disturbs the first batch's keys less.
    def second_batch_drift(final, k_first, preserve):
        first_only, _ = schedule.sequential_batched_edit(
            params, cfg, tok, REQUESTS[:2], h, covariances=covs, templates=GROUPS, batch_size=2, progress=False)
        w1 = np.asarray(first_only["layers"]["down_proj"][1])
        return np.linalg.norm((np.asarray(final["layers"]["down_proj"][1]) - w1) @ k_first)
    plain = second_batch_drift(*seen[0], False)
    kept = second_batch_drift(*seen[1], True)
    assert kept < 0.9 * plain, (kept, plain)


def test_sequential_batched_with_the_first_batch_values_given(setup):
    """Values given for the first batch (e.g. shared through a value cache) give the same run as values
    computed in it; values of other requests, or for batch 2 on the unedited model, are refused."""
    cfg, params, tok, covs = setup
    h = hp("memit")
    run = lambda **kw: schedule.sequential_batched_edit(params, cfg, tok, REQUESTS, h, covariances=covs,
                                                        templates=GROUPS, batch_size=2, progress=False, **kw)
    computed, _ = run()
    first = editor.edit_values(params, cfg, tok, REQUESTS[:2], h, templates=GROUPS)
    given, outcomes = run(first_values=first)
    for a, b in zip(jax.tree_util.tree_leaves(computed), jax.tree_util.tree_leaves(given)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert len(outcomes) == 2
    wrong = editor.edit_values(params, cfg, tok, REQUESTS[2:], h, templates=GROUPS)
    with pytest.raises(ValueError, match="other requests"):
        run(first_values=wrong)


def test_sequential_rome_and_batch_checks(setup):
    cfg, params, tok, covs = setup
    final, outcomes = schedule.sequential_edit(params, cfg, tok, REQUESTS[:2], hp("rome"), covariances=covs,
                                               templates=GROUPS, progress=False)
    assert len(outcomes) == 2 and all(o.report.method == "rome" for o in outcomes)
    with pytest.raises(ValueError, match="ROME edits one fact at a time: use batch_size=1"):
        schedule.sequential_batched_edit(params, cfg, tok, REQUESTS, hp("rome"), covariances=covs,
                                         templates=GROUPS, batch_size=2)
