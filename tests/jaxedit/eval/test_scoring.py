"""Scoring as packed prefix trees: the packing's invariants, and packed == naive on a tiny model and SmolLM2."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.editing import tokenize
from jaxedit.eval import nll, scoring
from llama3_flax import model as lmodel
from tests.jaxedit.eval.vocabulary import word_tokenizer as WordTokenizer


def _check_tree_rows(seqs, rows, paths, width):
    """Each path spells its sequence; a slot's subtree [slot, end) holds exactly its descendants."""
    for seq, (r, path) in zip(seqs, paths):
        assert tuple(rows[r].tokens[k] for k in path) == tuple(seq)
        assert tuple(rows[r].depths[k] for k in path) == tuple(range(len(seq)))
        assert all(a < b < rows[r].ends[a] for a, b in zip(path, path[1:]))  # ancestors' subtrees hold it
    for row in rows:
        assert len(row.tokens) <= width
        for slot, (depth, end) in enumerate(zip(row.depths, row.ends)):
            assert slot < end <= len(row.tokens)
            assert all(row.depths[k] > depth for k in range(slot + 1, end))  # only descendants inside


def test_pack_token_trees_shares_prefixes_in_depth_first_order():
    seqs = [(5, 6, 7), (5, 6, 8, 9), (1, 2), (5, 6, 7), (5,), (3, 4, 4, 4)]
    rows, paths = scoring.pack_token_trees(seqs, width=8)
    # trees (1 2), (3 4 4 4), (5 6 7 8 9): first fit in decreasing size
    assert [r.tokens for r in rows] == [(5, 6, 7, 8, 9, 1, 2), (3, 4, 4, 4)]
    assert rows[0].depths == (0, 1, 2, 2, 3, 0, 1) and rows[0].ends == (5, 5, 3, 5, 5, 7, 7)
    assert rows[1].depths == (0, 1, 2, 3) and rows[1].ends == (4, 4, 4, 4)  # 7 is a leaf; 8's subtree holds 9
    assert paths[0] == paths[3] == (0, (0, 1, 2)) and paths[1] == (0, (0, 1, 3, 4)) and paths[4] == (0, (0,))
    assert paths[2] == (0, (5, 6))
    _check_tree_rows(seqs, rows, paths, 8)
    with pytest.raises(ValueError, match="5 tokens does not fit rows of width 4"):
        scoring.pack_token_trees([(1, 2, 3, 4, 5)], width=4)


def test_pack_token_trees_splits_big_trees_and_fills_rows():
    rng = np.random.default_rng(0)
    seqs = [tuple(int(t) for t in rng.integers(0, 3, size=rng.integers(1, 9))) for _ in range(200)]
    rows, paths = scoring.pack_token_trees(seqs, width=16)
    _check_tree_rows(seqs, rows, paths, 16)
    distinct_prefixes = {s[:k] for s in seqs for k in range(1, len(s) + 1)}
    n_tokens = sum(len(r.tokens) for r in rows)
    # a tree bigger than a row is cut, repeating only the cut prefixes; rows are nearly full
    assert len(distinct_prefixes) <= n_tokens < 1.5 * len(distinct_prefixes)
    assert n_tokens / (16 * len(rows)) > 0.85


# -------------------------------------------------------------------------- packed == naive, tiny model
PAIRS = [
    ("The capital of France is", "Paris"),
    ("The capital of France is", "London"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", "English language"),
    ("Toko Yasuda plays the", "piano"),
    ("Toko Yasuda plays the", "electric guitar of the city"),
    ("a", "b"),
    ("the river in the city is located in the continent of", "Europe"),
    ("where the river and the city and the language of the capital of France", "Asia or Europe"),
    ("the city of", "Paris"),
]


@pytest.mark.parametrize("add_bos", [True, False])
def test_packed_scoring_matches_naive(tiny, add_bos):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, add_bos)
    before = scoring.score_tree_rows._cache_size()
    # narrow rows and 2 rows per call: several calls, prefix trees split across rows
    got = scoring.score_pairs(params, cfg, tok, PAIRS, batch_size=2, row_width=16)
    assert scoring.score_tree_rows._cache_size() - before <= 3   # few shapes, whatever the number of rows
    np.testing.assert_allclose(scoring.score_pairs(params, cfg, tok, PAIRS[::-1], batch_size=64)[::-1], got,
                               atol=2e-5, rtol=0)  # one call, one wide row: the same numbers

    want = []
    for prompt, target in PAIRS:
        p, t = tokenize.encode_prompt(tok, prompt), tokenize.encode_target(tok, target)
        assert (p[0] == tok.bos_token_id) == add_bos and tok.bos_token_id not in t
        # one sequence at a time through the full-logits forward; right padding to one width (which a
        # causal model cannot see) only saves compilations
        n = len(p) + len(t)
        seq = jnp.array([p + t + [0] * (24 - n)], jnp.int32)
        mask = jnp.array([[1] * n + [0] * (24 - n)], jnp.int32)
        logits = lmodel.forward(params, cfg, seq, mask)
        tm = jnp.array([[0] * len(p) + [1] * len(t) + [0] * (24 - n)])
        want.append(float(nll.sequence_target_nll(logits, seq, tm)[0]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.std(got) > 0.05  # the pairs are really scored differently


# ------------------------------------------------------------------------------------------ SmolLM2
def test_smollm2_paris_beats_london(smollm2):
    cfg, params, tok = smollm2
    nll = scoring.score_pairs(params, cfg, tok, [("The capital of France is", "Paris"),
                                                 ("The capital of France is", "London")], batch_size=2)
    assert nll[0] < nll[1] - 1.0


# ------------------------------------------------------------------------------ inputs the model cannot take
def test_tokenizer_bigger_than_the_vocabulary(tiny):
    from jaxedit import testing

    cfg, params = tiny  # vocab_size 96
    big = testing.WordTokenizer(4096)
    with pytest.raises(ValueError, match="the tokenizer has 4096 tokens but the model's vocab_size is 96"):
        tokenize.check_tokenizer(big, cfg)
    tokenize.check_tokenizer(WordTokenizer(96, True), cfg)  # its own size is fine
    # the ids themselves are checked where the batches are built: JAX would clamp them silently
    with pytest.raises(ValueError, match=r"scored pair 0: token id \d+ is outside the model's vocabulary "
                                         r"\(vocab_size 96\)"):
        scoring.score_pairs(params, cfg, big, [("xylophone zebra", "quokka")])
    encoded = [scoring.EncodedPair((1, 5), (7,)), scoring.EncodedPair((1, 5), (96,))]
    with pytest.raises(ValueError, match=r"scored pair 1: token id 96 is outside.*vocab_size 96"):
        scoring.score_encoded(params, cfg, encoded)


def test_pair_longer_than_max_position_embeddings(tiny):
    cfg, params = tiny
    short = cfg.replace(max_position_embeddings=8)
    tok = WordTokenizer(cfg.vocab_size, True)
    pair = [("the river in the city is located in the", "Europe")]  # BOS + 9 words, + 1 target token
    assert np.isfinite(scoring.score_pairs(params, cfg, tok, pair)).all()
    with pytest.raises(ValueError, match=r"a scored prompt \+ target \(less its last token\): a sequence of 10 "
                                         r"tokens is longer than the model's max_position_embeddings \(8\)"):
        scoring.score_pairs(params, short, tok, pair)
    # exactly max_position_embeddings tokens processed (the last target token is only predicted) is fine
    assert np.isfinite(scoring.score_pairs(params, short, tok, [("the river in the city is", "located Europe")])).all()
