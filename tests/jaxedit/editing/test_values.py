"""The batched, prefix-cached value optimisation against a naive per-request full-sequence loop."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama3_flax.model import Capture, Injection, forward
from jaxedit.hparams import ValueHparams
from jaxedit.requests import EditRequest
from jaxedit.editing.values import build_value_batch, compute_values, optimise_values, pack_suffixes

TEMPLATES = ("{}", "Once upon a time. {}", "Because of that, {}")
REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0),
    EditRequest("{} is a twin city of", "Lyon", "Beijing", case_id=1),
    EditRequest("The official religion of {} is", "Edwin of Northumbria", "Islam", case_id=2),
]


def naive_values(params, cfg, tok, request, layer, hp, site, templates=TEMPLATES):
    """One request, full sequences, injection through llama3_flax.model.Injection, plain Python loop.
    Returns (init, delta, loss, the number of Adam steps taken)."""
    target = tok(" " + request.target_new, add_special_tokens=False)["input_ids"]
    rows, lookups, starts = [], [], []
    for t in tuple(templates) + ("{} is a",):
        text = t.replace("{}", request.prompt if t != "{} is a" else "{}").replace("{}", request.subject)
        prefix = text[: text.index(request.subject)]
        prompt = tok(text)["input_ids"]
        rows.append(prompt + (target[:-1] if t != "{} is a" else []))
        lookups.append(len(tok(prefix + request.subject)["input_ids"]) - 1)
        starts.append(len(prompt) - 1)
    width = max(map(len, rows))
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    mask = jnp.asarray([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lookup = jnp.asarray(lookups)[:, None]
    _, cap = forward(params, cfg, tokens, mask, capture=Capture(jnp.asarray([layer]), lookup))
    init = (cap.mlp_out if site == "mlp" else cap.resid_out)[0, 0, 0]
    n_rw = len(templates)

    def loss_fn(delta, ref_kl):
        inj = Injection(layer=jnp.int32(layer), positions=lookup, delta=jnp.broadcast_to(delta, (len(rows), 1, delta.shape[0])))
        logp = jax.nn.log_softmax(forward(params, cfg, tokens, mask, inject=inj), axis=-1)
        nll = 0.0
        for r in range(n_rw):
            nll += -sum(logp[r, starts[r] + j, target[j]] for j in range(len(target))) / len(target)
        nll = nll / n_rw
        kl_lp = logp[n_rw, lookups[n_rw]]
        kl = jnp.sum(jnp.exp(kl_lp) * (kl_lp - ref_kl))
        # most probable: each target token is the argmax at its position on every rewriting prompt
        top = jnp.all(jnp.asarray([jnp.argmax(logp[r, starts[r] + j]) == target[j]
                                   for r in range(n_rw) for j in range(len(target))]))
        return (nll + hp.kl_factor * kl + hp.v_weight_decay * jnp.sqrt(jnp.sum(delta ** 2) + 1e-30) / jnp.sum(init ** 2),
                (kl_lp, top))

    delta = jnp.zeros_like(init)
    _, (ref_kl, _) = jax.jit(loss_fn)(delta, jnp.zeros(cfg.vocab_size))
    opt = optax.adam(hp.v_lr)
    state = opt.init(delta)
    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    for it in range(hp.v_num_grad_steps):
        (loss, (_, top)), grad = loss_and_grad(delta, ref_kl)
        if loss < hp.early_stop_loss or it == hp.v_num_grad_steps - 1 or (hp.most_probable_stop and top):
            break
        upd, state = opt.update(grad, state, delta)
        delta = delta + upd
        max_norm = hp.clamp_norm_factor * jnp.linalg.norm(init)
        if jnp.linalg.norm(delta) > max_norm:
            delta = delta * max_norm / jnp.linalg.norm(delta)
    return np.asarray(init), np.asarray(delta), float(loss), it


@pytest.mark.parametrize("site,layer", [("resid", 1), ("mlp", 0)])
def test_batched_prefix_cached_values_equal_naive_loop(tiny_with_tokenizer, site, layer):
    cfg, params, tok = tiny_with_tokenizer
    hp = ValueHparams(v_num_grad_steps=6, v_lr=0.5, clamp_norm_factor=0.75)
    vals = compute_values(params, cfg, tok, REQUESTS, TEMPLATES, layer, hp, site=site)
    for i, r in enumerate(REQUESTS):
        init, delta, loss, _ = naive_values(params, cfg, tok, r, layer, hp, site)
        np.testing.assert_allclose(np.asarray(vals.init[i]), init, rtol=1e-5, atol=1e-6)
        err = np.linalg.norm(np.asarray(vals.delta[i]) - delta) / np.linalg.norm(delta)
        assert err < 1e-4, (i, err)
        assert abs(float(vals.loss[i]) - loss) < 1e-4 * max(1.0, abs(loss))
        np.testing.assert_allclose(np.asarray(vals.target[i]), np.asarray(vals.init[i] + vals.delta[i]), rtol=1e-6)


def test_most_probable_early_stopping_stops_where_a_naive_loop_first_sees_it():
    """ENCORE's criterion: each request stops at the first step at which its target is the top token
    on all its prompts, as a per-request loop checking argmax after every step finds. The targets are
    the model's most likely and second most likely next words: one stops at once, one later."""
    from jaxedit import testing

    cfg, params, tok = testing.tiny_model(num_hidden_layers=3, vocab_size=256, std=0.3)
    for w in (f"w{i}x{j}" for i in range(40) for j in range(60)):  # names for (nearly) every token id
        tok(w)
    requests = []
    for rank, r in zip((0, 1), REQUESTS):
        logits = np.asarray(forward(params, cfg, jnp.asarray([tok(r.prompt.format(r.subject))["input_ids"]]))[0, -1])
        tid = [i for i in np.argsort(-logits) if i >= 3 and i in tok.words][rank]
        requests.append(EditRequest(r.prompt, r.subject, tok.words[tid], case_id=r.case_id))
    hp = ValueHparams(v_num_grad_steps=8, v_lr=2.0, early_stop_loss=0.0, most_probable_stop=True)
    vals = compute_values(params, cfg, tok, requests, ("{}",), 1, hp)
    steps = []
    for i, r in enumerate(requests):
        _, delta, _, it = naive_values(params, cfg, tok, r, 1, hp, "resid", templates=("{}",))
        steps.append(it)
        assert int(vals.steps[i]) == it, (i, int(vals.steps[i]), it)
        if it:  # the same steps: the same delta, to float32 summation order
            assert np.linalg.norm(np.asarray(vals.delta[i]) - delta) / np.linalg.norm(delta) < 1e-4
        else:
            assert not np.any(np.asarray(vals.delta[i]))
    assert steps[0] == 0 and 0 < min(steps[1:]) and max(steps) < hp.v_num_grad_steps - 1, steps
    plain = compute_values(params, cfg, tok, requests, ("{}",), 1, dataclasses.replace(hp, most_probable_stop=False))
    assert np.all(np.asarray(plain.steps) == hp.v_num_grad_steps - 1)


def test_clamp_and_steps(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    hp = ValueHparams(v_num_grad_steps=5, v_lr=5.0, clamp_norm_factor=0.1)
    vals = compute_values(params, cfg, tok, REQUESTS, TEMPLATES, 1, hp)
    ratio = np.linalg.norm(np.asarray(vals.delta), axis=1) / np.linalg.norm(np.asarray(vals.init), axis=1)
    assert np.all(ratio <= 0.1 + 1e-5) and np.all(ratio > 0.09)  # clamped, and the clamp is active
    assert np.all(np.asarray(vals.steps) == 4)  # 5 evaluations, the last without an update


def test_early_stopping_freezes_a_request(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    # An early-stop threshold above every loss stops each request at the first evaluation.
    hp = ValueHparams(v_num_grad_steps=5, early_stop_loss=1e9)
    vals = compute_values(params, cfg, tok, REQUESTS, TEMPLATES, 1, hp)
    assert np.all(np.asarray(vals.steps) == 0)
    assert np.all(np.asarray(vals.delta) == 0)


def test_value_errors(tiny_with_tokenizer):
    cfg, params, tok = tiny_with_tokenizer
    with pytest.raises(ValueError, match="unknown layer 7"):
        compute_values(params, cfg, tok, REQUESTS, TEMPLATES, 7, ValueHparams())
    with pytest.raises(ValueError, match="only the last layer"):
        compute_values(params, cfg, tok, REQUESTS, TEMPLATES, 1, ValueHparams(v_loss_layer=1))
    with pytest.raises(ValueError, match="site must be"):
        compute_values(params, cfg, tok, REQUESTS, TEMPLATES, 1, ValueHparams(), site="attn")


def test_pack_suffixes_picks_the_width_with_fewest_slots():
    # nine suffixes of 5 tokens: lanes of 8 hold one (9 lanes -> bucket 12: 96 slots), of 12 two
    # (5 -> 6: 72), of 16 three (3: 48), of 24 four (3: 72), of 32 six (2: 64)
    lanes, first = pack_suffixes([7] * 9, [2] * 9)
    assert lanes.row.shape == (3, 16)
    assert sorted(np.asarray(first).tolist()) == [0, 5, 10, 16, 21, 26, 32, 37, 42]
    lanes, _ = pack_suffixes([7] * 9, [2] * 9, widths=(8, 12))
    assert lanes.row.shape == (6, 12)
    lanes, _ = pack_suffixes([40, 7], [2, 2])  # a suffix (38) longer than every width: rounded up to 8
    assert lanes.row.shape == (2, 40)


def test_pack_suffixes_places_every_suffix_token_once():
    lengths, lookup = [9, 6, 12, 5, 7, 4], [6, 2, 10, 4, 2, 1]  # suffixes 3, 4, 2, 1, 5, 3
    lanes, first = pack_suffixes(lengths, lookup, widths=(8,))
    row, slot, end = (np.asarray(x) for x in (lanes.row, lanes.slot, lanes.end))
    assert row.shape[1] == 8 and row.shape[0] == 3  # 18 tokens: 3 lanes (first fit); 3 is a geometric bucket
    real = end > 0
    placed = sorted(zip(row[real].tolist(), slot[real].tolist()))
    assert placed == sorted((r, s) for r in range(6) for s in range(lookup[r], lengths[r]))
    inject = np.asarray(lanes.inject).ravel()
    np.testing.assert_array_equal(np.flatnonzero(inject), np.sort(first))
    for r, f in enumerate(first):  # a row's tokens are contiguous, in order, and end where its end says
        lane, i = divmod(int(f), 8)
        n = lengths[r] - lookup[r]
        np.testing.assert_array_equal(slot[lane, i:i + n], np.arange(lookup[r], lengths[r]))
        assert set(end[lane, i:i + n].tolist()) == {i + n}
        # its cached prefix: slots 0..lookup-1 of the row, seen from lane slots [i, i + n)
        mine = (np.asarray(lanes.cache_row)[lane] == r) & (np.asarray(lanes.cache_end)[lane] > 0)
        np.testing.assert_array_equal(np.asarray(lanes.cache_slot)[lane][mine], np.arange(lookup[r]))
        assert set(np.asarray(lanes.cache_start)[lane][mine].tolist()) == {i}


def test_layer_window_never_changes_values(tiny_with_tokenizer):
    """compute_values scans a window of the last layers: every window covering layer + 1 gives the
    all-layers values; one that does not gives NaN (refused by the editor), never a wrong value."""
    cfg, params, tok = tiny_with_tokenizer
    hp = ValueHparams(v_num_grad_steps=4, v_lr=0.5)
    layer = 0
    batch = build_value_batch(tok, REQUESTS, TEMPLATES)
    every = optimise_values(params, cfg, batch, jnp.int32(layer), hp, "resid", window=None)
    vals = compute_values(params, cfg, tok, REQUESTS, TEMPLATES, layer, hp)
    np.testing.assert_allclose(np.asarray(vals.delta), np.asarray(every.delta), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(vals.delta)).max() > 0
    short = optimise_values(params, cfg, batch, jnp.int32(layer), hp, "resid",
                            window=cfg.num_hidden_layers - layer - 2)
    assert np.all(np.isnan(np.asarray(short.delta)))
    # and the editor refuses NaN values before touching the weights
    from jaxedit.editing import editor
    from jaxedit.hparams import EditHparams
    hp_edit = EditHparams(method="memit", layers=(layer,), value=hp)
    poisoned = vals.replace(target=vals.target.at[1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"target values of case\(s\) \[1\] contain NaN"):
        editor.edit(params, cfg, tok, REQUESTS, hp_edit, covariances={layer: jnp.eye(cfg.intermediate_size)},
                    templates=(("{}",),), values=poisoned)


@pytest.mark.parametrize("window", [None, 2])
def test_rematerialised_layers_give_the_same_values(tiny_with_tokenizer, window):
    """remat only changes what the backward pass keeps in memory, never the values."""
    cfg, params, tok = tiny_with_tokenizer
    hp = ValueHparams(v_num_grad_steps=4, v_lr=0.5)
    batch = build_value_batch(tok, REQUESTS, TEMPLATES)
    plain = optimise_values(params, cfg, batch, jnp.int32(0), hp, "resid", window=window)
    remat = optimise_values(params, cfg, batch, jnp.int32(0), hp, "resid", window=window, remat=True)
    assert np.abs(np.asarray(plain.delta)).max() > 0
    np.testing.assert_allclose(np.asarray(remat.delta), np.asarray(plain.delta), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(remat.steps), np.asarray(plain.steps))
