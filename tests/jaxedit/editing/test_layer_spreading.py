"""Spreading one batch over a window of consecutive layers (MEMIT, and EMMET as its reference code
does) against an independent float64 NumPy implementation of the layer-by-layer algorithm: before
each layer, read the keys and the output at the values' layer from the model as edited so far
(llama3_flax's forward with a Capture; tokens and subject positions found here from the tokenizer),
write residual / (layers left) with the closed form in NumPy, add it, go on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import testing
from jaxedit.cache import model_fingerprint
from jaxedit.editing import editor, pm
from jaxedit.editing.values import Values, ValuesFor, request_digest
from jaxedit.hparams import EditHparams
from jaxedit.requests import EditRequest
from llama3_flax import config as lconfig, model as lmodel

GROUPS = (("{}",), ("Once upon a time. {}", "Because of that, {}"))
REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
    EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1),
    EditRequest("The official religion of {} is", "Edwin of Northumbria", "Islam", case_id=2),
]
LAM, EMMET_LAMBDA = 2.0, 0.1
WINDOW = (1, 2, 3)
TOL = 2e-4  # float32 forward passes and float32 weights on both sides; the solves are float64
ROWS, WIDTH = 8, 24  # every forward here pads to one shape (one compiled program)


@pytest.fixture(scope="module")
def setup():
    cfg = lconfig.tiny(num_hidden_layers=4, vocab_size=256)
    tok = testing.WordTokenizer(256)
    rng = np.random.default_rng(0)
    # random weights from NumPy (jax.random would compile a program per weight shape)
    params = jax.tree_util.tree_map_with_path(
        lambda path, shape: jnp.asarray((1.0 + 0.1 * rng.standard_normal(shape)) if "norm" in jax.tree_util.keystr(path)
                                        else 0.1 * rng.standard_normal(shape), jnp.float32),
        lmodel.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    a = rng.standard_normal((cfg.intermediate_size, 4 * cfg.intermediate_size))
    C0 = (a @ a.T / a.shape[1] + 0.1 * np.eye(cfg.intermediate_size)).astype(np.float32)
    hp = EditHparams(method="memit", layers=WINDOW, mom2_update_weight=LAM, emmet_lambda=EMMET_LAMBDA)
    # Any target values will do for the spreading (the value optimisation is tested elsewhere): the
    # unedited output at the window's last layer plus a random shift, labelled for these requests.
    _, resid = _captured(params, cfg, tok, ("{}",), [WINDOW[-1]])
    init = resid[0].astype(np.float32)
    delta = (0.5 * rng.standard_normal(init.shape) * np.linalg.norm(init, axis=1, keepdims=True)
             / np.sqrt(cfg.hidden_size)).astype(np.float32)
    zeros = jnp.zeros(len(REQUESTS))
    values = Values(target=jnp.asarray(init + delta), init=jnp.asarray(init), delta=jnp.asarray(delta), loss=zeros,
                    nll=zeros, steps=zeros,
                    made_for=ValuesFor(model=model_fingerprint(params, cfg), layer=WINDOW[-1], site="resid",
                                       requests=tuple(request_digest(r) for r in REQUESTS)))
    return cfg, params, tok, C0, hp, values


def _rows(tok, templates):
    """Token rows (request-major, then template) and each row's subject-last-token index."""
    ids, last = [], []
    for r in REQUESTS:
        before, after = r.prompt.split("{}")
        for t in templates:
            outer_before, outer_after = t.split("{}")
            ids.append(tok(outer_before + before + r.subject + after + outer_after)["input_ids"])
            last.append(len(tok(outer_before + before + r.subject)["input_ids"]) - 1)
    assert len(ids) <= ROWS and max(map(len, ids)) <= WIDTH
    tokens = np.zeros((ROWS, WIDTH), np.int32)
    mask = np.zeros((ROWS, WIDTH), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask, np.asarray(last + [0] * (ROWS - len(last)), np.int32)


def _captured(params, cfg, tok, templates, layers):
    tokens, mask, last = _rows(tok, templates)
    _, c = lmodel.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                          capture=lmodel.Capture(layers=jnp.asarray(layers, jnp.int32), positions=jnp.asarray(last[:, None])))
    n = len(REQUESTS) * len(templates)
    return np.asarray(c.mlp_in[:, :n, 0], np.float64), np.asarray(c.resid_out[:, :n, 0], np.float64)


def _keys(params, cfg, tok, layer):
    """(F, n): the mean over each template group, then over the groups."""
    per_group = []
    for g in GROUPS:
        mlp_in, _ = _captured(params, cfg, tok, g, [layer])
        per_group.append(mlp_in[0].reshape(len(REQUESTS), len(g), -1).mean(axis=1))
    return np.mean(per_group, axis=0).T


def _numpy_spreading(params, cfg, tok, C0, targets, layers, method, recompute_keys=True):
    """The layer-by-layer algorithm in float64 NumPy; returns {layer: dW}."""
    C0 = np.asarray(C0, np.float64)
    z = np.asarray(targets, np.float64)           # (n, D) values at layers[-1]
    first_keys = {l: _keys(params, cfg, tok, l) for l in layers} if not recompute_keys else None
    deltas, current_params = {}, params
    for i, layer in enumerate(layers):
        K = _keys(current_params, cfg, tok, layer) if recompute_keys else first_keys[layer]
        _, resid = _captured(current_params, cfg, tok, ("{}",), [layers[-1]])
        R = (z - resid[0]).T / (len(layers) - i)
        if method == "memit":   # R K^T (lam C0 + K K^T)^-1
            dW = np.linalg.solve(LAM * C0 + K @ K.T, K @ R.T).T
        else:                   # R (K^T C^-1 K + e I)^-1 K^T C^-1, C = lam C0
            Cinv_K = np.linalg.solve(LAM * C0, K)
            dW = R @ np.linalg.solve(K.T @ Cinv_K + EMMET_LAMBDA * np.eye(K.shape[1]), Cinv_K.T)
        deltas[layer] = dW
        w = np.asarray(current_params["layers"]["down_proj"])
        w = w.copy()
        w[layer] = (w[layer].astype(np.float64) + dW).astype(w.dtype)
        current_params = {**current_params, "layers": {**current_params["layers"], "down_proj": jnp.asarray(w)}}
    return deltas


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_window_equals_numpy_layer_by_layer_spreading(setup, method):
    cfg, params, tok, C0, hp, values = setup
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)
    hp = hp.replace(method=method)
    new, report = editor.edit(params, cfg, tok, REQUESTS, hp, covariances={l: C0 for l in WINDOW}, templates=GROUPS,
                              values=values)
    want = _numpy_spreading(params, cfg, tok, C0, values.target, WINDOW, method)
    old_w, new_w = np.asarray(params["layers"]["down_proj"]), np.asarray(new["layers"]["down_proj"])
    for layer in WINDOW:
        assert _rel(new_w[layer] - old_w[layer], want[layer]) < TOL, layer
    assert report.layers == WINDOW and len(report.delta_norms) == 3
    # keys recomputed after each layer's update matter: the same algorithm with stale keys is far off
    stale = _numpy_spreading(params, cfg, tok, C0, values.target, WINDOW, method, recompute_keys=False)
    assert _rel(stale[WINDOW[-1]], want[WINDOW[-1]]) > 50 * TOL
    # other layers, every other weight, and the input tree stay as they were
    np.testing.assert_array_equal(new_w[0], old_w[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        name = jax.tree_util.keystr(path)
        if "down_proj" not in name:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_at(before, path)), err_msg=name)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(x), y)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_window_of_one_is_the_one_layer_edit(setup):
    cfg, params, tok, C0, hp, values = setup
    last = WINDOW[-1]
    new, report = editor.edit(params, cfg, tok, REQUESTS, hp.replace(layers=(last,)), covariances={last: C0},
                              templates=GROUPS, values=values)
    got = np.asarray(new["layers"]["down_proj"][last]) - np.asarray(params["layers"]["down_proj"][last])
    want = _numpy_spreading(params, cfg, tok, C0, values.target, (last,), "memit")[last]
    assert _rel(got, want) < TOL
    # ... the plain one-layer MEMIT update of these keys and residuals
    _, resid = _captured(params, cfg, tok, ("{}",), [last])
    K = _keys(params, cfg, tok, last)
    R = (np.asarray(values.target, np.float64) - resid[0]).T
    assert _rel(pm.memit_delta(C0, K.astype(np.float32), R.astype(np.float32), LAM), want) < TOL
    changed = [l for l in range(cfg.num_hidden_layers)
               if not np.array_equal(new["layers"]["down_proj"][l], params["layers"]["down_proj"][l])]
    assert changed == [last] and len(report.delta_norms) == 1
