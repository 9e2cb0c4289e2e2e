"""Causal tracing on a tiny random model: the one-program trace against a loop written here that
restores one state per full forward pass; exact recoveries; noise-free runs; the lanes; bad inputs."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import testing
from jaxedit.tracing import groups, knowns, lanes, trace
from llama3_flax import math as lm
from llama3_flax import model

FACT = knowns.KnownFact(7, "Vinson Massif", "Antarctica", "Vinson Massif is located in the continent of")
INNER = knowns.KnownFact(8, "Paris", "France", "The city of Paris is the capital of")


@pytest.fixture(scope="module")
def tiny():
    cfg, params, tok = testing.tiny_model(num_hidden_layers=4)
    return cfg, params, tok


def _layers(params, i):
    return jax.tree_util.tree_map(lambda w: w[i], params["layers"])


def _clean_states(cfg, params, tokens):
    """Per layer the residual, MLP and attention outputs (L, T, D) of a plain layer loop, and the final h."""
    t = len(tokens)
    slots = jnp.arange(t)[None]
    cos, sin = lm.rope_angles(cfg, slots)
    bias = lm.attention_bias(slots, slots, jnp.ones((1, t), jnp.int32))
    h = model.embed(params, jnp.asarray(tokens))[None]
    resid, mlp, attn = [], [], []
    for i in range(cfg.num_hidden_layers):
        h_mid = model.attention_block(cfg, _layers(params, i), h, cos, sin, bias)[0]
        h_out = model.mlp_block(cfg, _layers(params, i), h_mid)[0]
        resid.append(h_out[0]), mlp.append((h_out - h_mid)[0]), attn.append((h_mid - h)[0])
        h = h_out
    return jnp.stack(resid), jnp.stack(mlp), jnp.stack(attn), h


@functools.partial(jax.jit, static_argnames=("cfg",))
def _one_restoration(params, cfg, x, clean, target, kind, token, first, last):
    """P(target) averaged over the rows of x (S, T, D) with one state restored, every layer run."""
    s, t, _ = x.shape
    slots = jnp.broadcast_to(jnp.arange(t), (s, t))
    cos, sin = lm.rope_angles(cfg, slots)
    bias = lm.attention_bias(slots, slots, jnp.ones((s, t), jnp.int32))
    resid, mlp, attn = clean
    h = x
    for i in range(cfg.num_hidden_layers):
        here = ((jnp.arange(t) == token) & (first <= i) & (i <= last))[None, :, None]
        h_mid = model.attention_block(cfg, _layers(params, i), h, cos, sin, bias)[0]
        h_mid = jnp.where(here & (kind == model.RESTORE_ATTN), h + attn[i], h_mid)
        h_out = model.mlp_block(cfg, _layers(params, i), h_mid)[0]
        h_out = jnp.where(here & (kind == model.RESTORE_MLP), h_mid + mlp[i], h_out)
        h = jnp.where(here & (kind == model.RESTORE_RESID), resid[i], h_out)
    return jnp.mean(jax.nn.softmax(model.logits_from_hidden(params, cfg, h[:, -1]), axis=-1)[:, target])


def _loop_trace(cfg, params, fact, target, std, tc):
    tokens = np.asarray(fact.tokens)
    *clean, _ = _clean_states(cfg, params, tokens)
    noise = trace.corruption_noise(fact, len(tokens), cfg.hidden_size, std, tc.noise_samples, tc.seed)
    x = model.embed(params, jnp.asarray(tokens))[None] + noise
    l, t = cfg.num_hidden_layers, len(tokens)
    scores = np.zeros((3, l, t))
    for k, code in enumerate(lanes.KIND_CODES):
        for layer in range(l):
            first, last = lanes.restored_layers(code, layer, l, tc.window)
            for token in range(t):
                scores[k, layer, token] = _one_restoration(params, cfg, x, tuple(clean), target, code, token, first, last)
    return scores


@pytest.mark.parametrize("fact, window, samples", [(FACT, 10, 3), (INNER, 2, 2)])
def test_one_program_equals_one_restoration_per_forward_pass(tiny, fact, window, samples):
    cfg, params, tok = tiny
    encoded = knowns.encode_fact(tok, fact)
    tc = trace.TraceConfig(noise_samples=samples, window=window, length_multiple=4, chunk_tokens=64)
    std = trace.embedding_noise_std(params, knowns.subject_token_ids([encoded]))
    got = trace.trace_fact(params, cfg, encoded, 11, std, tc)
    want = _loop_trace(cfg, params, encoded, 11, std, tc)
    assert got.scores.shape == (3, cfg.num_hidden_layers, len(encoded.tokens))
    np.testing.assert_allclose(got.scores, want, atol=1e-5, rtol=0)
    assert got.p_corrupt != pytest.approx(got.p_clean, abs=1e-4)  # the noise does something
    # the library's own one-restoration-per-pass path agrees on a few sites
    sites = [(0, 0, 1), (1, 2, 3), (2, 3, len(encoded.tokens) - 1)]
    naive = trace.naive_trace(params, cfg, encoded, 11, std, tc, sites=sites)
    for site in sites:
        assert naive.scores[site] == pytest.approx(want[site], abs=1e-5)
    assert naive.p_corrupt == pytest.approx(got.p_corrupt, abs=1e-6)


def test_restoring_every_residual_state_gives_the_clean_probability(tiny):
    cfg, params, tok = tiny
    encoded = knowns.encode_fact(tok, FACT)
    tc = trace.TraceConfig(noise_samples=2)
    got = trace.trace_fact(params, cfg, encoded, 11, 5.0, tc)
    # the last layer's output at the last token is what the object is read from
    assert got.scores[0, -1, -1] == pytest.approx(got.p_clean, rel=1e-6)
    # every token at every layer
    t, l = len(encoded.tokens), cfg.num_hidden_layers
    tokens = jnp.asarray(encoded.tokens)
    p_clean, table = trace._clean_program(params, cfg, tokens, t, 11)
    noise = trace.corruption_noise(encoded, t, cfg.hidden_size, 5.0, 2, 0)
    x = model.embed(params, tokens)[None] + noise
    slots = jnp.broadcast_to(jnp.arange(t), (2, t))
    every = jnp.broadcast_to(jnp.arange(t), (2, t))
    restore = model.Restoration(slots=every, kind=jnp.zeros_like(every), first=jnp.zeros_like(every),
                                last=jnp.full_like(every, l - 1), source=every, values=table)
    h = model.run_layers_restoring(params, cfg, x, slots, lm.attention_bias(slots, slots, jnp.ones((2, t))), restore)
    p = jax.nn.softmax(model.logits_from_hidden(params, cfg, h[:, -1]), axis=-1)[:, 11]
    # two programs (the clean run and the restoring run) unembed the same state in different batch
    # shapes, so their float32 sums may be ordered differently: equal to float32 rounding
    np.testing.assert_allclose(np.asarray(p), np.full(2, float(p_clean), np.float32), rtol=1e-5)


def test_without_noise_nothing_has_an_effect(tiny):
    cfg, params, tok = tiny
    encoded = knowns.encode_fact(tok, FACT)
    got = trace.trace_fact(params, cfg, encoded, 11, 0.0, trace.TraceConfig(noise_samples=2))
    assert got.p_corrupt == pytest.approx(got.p_clean, abs=1e-7)
    assert np.abs(got.indirect_effect).max() <= 1e-6


@pytest.mark.parametrize("length, width", [(1, 2), (5, 6), (6, 6), (7, 12)])
def test_lanes_run_every_restoration_once_per_sample(length, width):
    l, s = 3, 2
    plan = lanes.plan_lanes(length, width, l, s, window=2, chunk_tokens=20)
    site, lane = plan.site, plan.lanes
    got = np.sort(site[site >= 0])
    every = [(k * l + layer) * width + t for k in range(3) for layer in range(l) for t in range(length)]
    np.testing.assert_array_equal(got, np.sort(np.repeat(every, s)))
    for g, c in zip(*np.nonzero((site >= 0).any(axis=2))):
        token = lane.token[g, c]
        for p in range(2):
            if site[g, c, p] < 0:
                continue
            t = site[g, c, p] % width
            a, b = lane.slots[g, c, p], lane.readout[g, c, p]
            np.testing.assert_array_equal(token[a:b + 1], np.arange(t, length))  # slots t.. of the prompt
            assert (lane.end[g, c, a:b + 1] == b + 1).all() and (lane.site_token[g, c, a:b + 1] == t).all()
            assert lane.chunk_first[g] <= lane.first[g, c, p]
    assert (lane.token[lane.end == 0] == -1).all()


def test_restored_layer_windows():
    assert lanes.restored_layers(model.RESTORE_RESID, 7, 30, 10) == (7, 7)
    assert lanes.restored_layers(model.RESTORE_MLP, 7, 30, 10) == (2, 11)
    assert lanes.restored_layers(model.RESTORE_ATTN, 2, 30, 10) == (0, 6)
    assert lanes.restored_layers(model.RESTORE_MLP, 28, 30, 10) == (23, 29)


def test_token_groups():
    # 2 tokens before the subject, a 3-token subject, then 3 more tokens
    assert groups.token_groups((2, 5), 8) == ((2,), (3,), (4,), (5,), (6,), (7,))
    # a one-token subject first; the subsequent token is the last one
    assert groups.token_groups((0, 1), 2) == ((0,), (), (0,), (1,), (), (1,))
    # a subject that ends the prompt has no subsequent token
    assert groups.token_groups((1, 3), 3) == ((1,), (), (2,), (), (), (2,))
    with pytest.raises(ValueError):
        groups.token_groups((2, 5), 4)


def test_averages_pool_the_tokens_of_every_fact():
    a = np.arange(3 * 2 * 4, dtype=float).reshape(3, 2, 4)  # subject (0, 3): middle token 1
    b = np.ones((3, 2, 6))  # subject (1, 5): middle tokens 2, 3
    mean, counts = groups.average_by_group([a, b], [(0, 3), (1, 5)])
    assert counts.tolist() == [2, 3, 2, 2, 0, 2]
    np.testing.assert_allclose(mean[:, 1], (a[:, :, 1] + 2 * b[:, :, 2]) / 3)
    assert np.isnan(mean[:, 4]).all()


def _write(tmp_path, records):
    path = tmp_path / "knowns.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_knowns_files_are_named(tmp_path):
    good = {"known_id": 3, "subject": "Paris", "attribute": "France", "prompt": "Paris is the capital of"}
    assert knowns.read_knowns(_write(tmp_path, [good]))[0] == knowns.KnownFact(3, "Paris", "France", good["prompt"])
    with pytest.raises(knowns.KnownsFileError, match="holds no facts"):
        knowns.read_knowns(_write(tmp_path, []))
    with pytest.raises(knowns.KnownsFileError, match="known_id 4.*'Lyon'.*not in its prompt"):
        knowns.read_knowns(_write(tmp_path, [good, {**good, "known_id": 4, "subject": "Lyon"}]))
    with pytest.raises(knowns.KnownsFileError, match="record 0: missing field"):
        knowns.read_knowns(_write(tmp_path, [{"subject": "Paris"}]))
    with pytest.raises(knowns.KnownsFileError, match="JSON list"):
        knowns.read_knowns(_write(tmp_path, {"facts": []}))
    with pytest.raises(FileNotFoundError):
        knowns.read_knowns(tmp_path / "missing.json")


def test_subject_tokens(tiny):
    _, _, tok = tiny
    encoded = knowns.encode_fact(tok, INNER)  # BOS, The, city, of, Paris, ...
    assert encoded.subject == (4, 5) and encoded.tokens[0] == testing.BOS
    assert encoded.answers == tuple(tok("France", add_special_tokens=False)["input_ids"])
    with pytest.raises(knowns.SubjectTokensError, match="known_id 9"):
        knowns.encode_fact(tok, knowns.KnownFact(9, "Vins", "x", "Vinson Massif is in"))


def test_peak_layer_intervals_from_resampled_facts():
    rising = np.tile(np.arange(5.0), (3, 1))[:, :, None]  # (kinds, L, T=1): peaks at the last layer
    falling = rising[:, ::-1] * 0.1
    sure = groups.peak_layer_interval([rising, rising], [(0, 1), (0, 1)], n_resamples=50)
    assert (sure[:, [0, 2, 5]] == 4).all() and (sure[:, [1, 3, 4]] == -1).all()  # one-token prompts
    mixed = groups.peak_layer_interval([rising, falling * 100], [(0, 1), (0, 1)], n_resamples=200)
    assert (mixed[:, 0] == [0, 4]).all()
