"""Independent edits scored in one pass against each edited model materialised and scored alone."""
import numpy as np
import pytest

from jaxedit.editing.editor import add_to_down_proj
from jaxedit.eval import independent, metrics, scoring
from jaxedit.requests import EditRequest
from tests.jaxedit.eval.vocabulary import word_tokenizer as WordTokenizer


def _cases():
    subjects = ["France", "Danielle Darrieux", "Toko Yasuda", "the Eiffel Tower", "Asia"]
    return tuple(
        EditRequest("The capital of {} is", s, "London", target_true="Paris", case_id=i,
                    paraphrase_prompts=(f"the city of {s} is", f"{s} capital is"),
                    neighborhood_prompts=("The capital of Asia is", "Toko Yasuda speaks"))
        for i, s in enumerate(subjects))


def _random_change(rng, cfg, rank, scale):
    """A (D, F) change of the given rank, large enough to move the scores."""
    a = rng.standard_normal((cfg.hidden_size, rank)) * scale
    b = rng.standard_normal((rank, cfg.intermediate_size))
    return (a @ b).astype(np.float32)


@pytest.mark.parametrize("layers,ranks", [((1,), (1, 1, 1, 1, 1)), ((0, 1), (1, 2, 3, 1, 2))])
def test_one_pass_equals_separate_models(tiny, layers, ranks):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    cases = _cases()
    rng = np.random.default_rng(0)
    changes, separate = [], []
    for case, rank in zip(cases, ranks):
        edited = params
        for layer in layers:
            edited = add_to_down_proj(edited, layer, _random_change(rng, cfg, rank, 0.3))
        changes.append(independent.change_of(params, edited, layers, rank))
        separate.append(metrics.evaluate(edited, cfg, tok, [case], batch_size=4, row_width=16).cases[0])
    edits = independent.stack_changes(changes)
    together = metrics.evaluate(params, cfg, tok, cases, batch_size=4, row_width=16, edits=edits).cases
    unedited = metrics.evaluate(params, cfg, tok, cases, batch_size=4, row_width=16).cases
    moved = 0.0
    for one, alone, base in zip(together, separate, unedited):
        for kind in ("rewrite_nll", "paraphrase_nll", "neighborhood_nll"):
            got, want = np.asarray(getattr(one, kind)), np.asarray(getattr(alone, kind))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            moved = max(moved, float(np.max(np.abs(want - np.asarray(getattr(base, kind))))))
        assert (one.es, one.ps, one.ns) == (alone.es, alone.ps, alone.ns)
    assert moved > 0.05  # the edits do change the scores: the comparison is not between unedited models


def test_pairs_of_different_edits_share_no_slots():
    seqs = [(1, 2, 3), (1, 2, 4), (1, 2, 3), (5, 6)]
    rows, paths = scoring.pack_token_trees(seqs, width=16, groups=[0, 0, 1, 1])
    assert sum(len(r.tokens) for r in rows) == 4 + 3 + 2  # (1,2,3)+(4) shared in group 0; group 1 alone
    for seq, group, (row, slots) in zip(seqs, [0, 0, 1, 1], paths):
        assert [rows[row].tokens[s] for s in slots] == list(seq)
        assert {rows[row].groups[s] for s in slots} == {group}
    with pytest.raises(ValueError, match="one int >= 0 per sequence"):
        scoring.pack_token_trees(seqs, width=16, groups=[0, 1])


def test_low_rank_factors_exact_and_refusals():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 30))
    left, right = independent.low_rank_factors(d, 2)
    x = rng.standard_normal((4, 30))
    np.testing.assert_allclose(x @ left @ right, x @ d.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank above 1"):
        independent.low_rank_factors(d, 1)
    with pytest.raises(ValueError, match=r"\(D, F\) matrix"):
        independent.low_rank_factors(d[0], 1)
    with pytest.raises(ValueError, match="NaN"):
        independent.low_rank_factors(np.full((3, 4), np.nan), 1)


def test_edits_must_fit_the_cases_and_the_model(tiny):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    cases = _cases()
    rng = np.random.default_rng(2)
    change = {1: independent.low_rank_factors(_random_change(rng, cfg, 1, 0.1), 1)}
    edits = independent.stack_changes([change] * 2)
    with pytest.raises(ValueError, match="2 edits for 5 cases"):
        metrics.evaluate(params, cfg, tok, cases, edits=edits)
    wrong_layer = independent.stack_changes([{cfg.num_hidden_layers: change[1]}] * 5)
    with pytest.raises(ValueError, match="not layers of a"):
        metrics.evaluate(params, cfg, tok, cases, edits=wrong_layer)
    wrong_width = independent.stack_changes([{1: (change[1][0][:-1], change[1][1])}] * 5)
    with pytest.raises(ValueError, match="expected"):
        metrics.evaluate(params, cfg, tok, cases, edits=wrong_width)


def test_a_small_edit_of_large_weights_is_rank_one_up_to_their_rounding(tiny):
    """Storing W + dW in float32 rounds every weight: when dW is tiny beside W (a late layer's edit)
    the stored difference is dW plus noise of norm up to eps * ||W + dW||, which is not rank, while a
    change of rank 2 is still refused."""
    cfg, params = tiny
    rng = np.random.default_rng(3)
    layer = 1
    w = params["layers"]["down_proj"][layer]
    big = {**params, "layers": {**params["layers"], "down_proj": params["layers"]["down_proj"].at[layer].set(w * 1e2)}}
    tiny_change = _random_change(rng, cfg, 1, 1e-4)
    edited = add_to_down_proj(big, layer, tiny_change)
    stored = np.asarray(edited["layers"]["down_proj"][layer]) - np.asarray(big["layers"]["down_proj"][layer])
    with pytest.raises(ValueError, match="rank above 1"):  # the noise alone exceeds 1e-3 of dW's norm
        independent.low_rank_factors(stored, 1)
    left, right = independent.change_of(big, edited, [layer], rank=1)[layer]
    noise = np.linalg.norm(stored - tiny_change)
    assert noise > 1e-3 * np.linalg.norm(tiny_change)
    got = left @ right  # (F, D) = dW.T, up to the projected noise
    assert np.linalg.norm(got - tiny_change.T) <= 2 * noise
    rank_two = add_to_down_proj(big, layer, _random_change(rng, cfg, 2, 1e-4))
    with pytest.raises(ValueError, match=r"rank above 1: .*beyond rounding noise"):
        independent.change_of(big, rank_two, [layer], rank=1)


def test_a_rank_one_change_orthogonal_to_the_first_test_vector_is_found():
    """A sketch of exactly r Gaussian columns misses a direction nearly orthogonal to them, and noise
    takes its place; the oversampled sketch still finds it (one of 64 late-layer edits did this)."""
    rng = np.random.default_rng(4)
    f, d = 96, 64
    first = np.random.default_rng(0).standard_normal((f, 1 + independent.OVERSAMPLE))[:, 0]
    v = rng.standard_normal(f)
    v -= (v @ first) / (first @ first) * first  # orthogonal to seed 0's first test vector
    change = np.outer(rng.standard_normal(d), v) + 1e-7 * rng.standard_normal((d, f))
    left, right = independent.low_rank_factors(change, 1)
    np.testing.assert_allclose((left @ right).T, change, atol=1e-5)
