"""Metrics: hand-made logits and NLLs with known answers, bucketed vs naive scoring, n-gram entropy, SmolLM2."""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import metrics, tokenize
from jaxedit.requests import EditRequest
from llama3_flax import config as lconfig
from llama3_flax import model as lmodel

WORDS = ("the of is in a and capital France Paris London mother tongue Danielle Darrieux English French "
         "speaks language river city located continent Europe Asia piano guitar plays Toko Yasuda").split()


class WordTokenizer:
    """A minimal stand-in for a Hugging Face tokenizer: one token per word, optional BOS.

    Known words get ids 3.., others a hash; a leading space is ignored (ids do not depend on it).
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int, add_bos: bool):
        self.vocab_size, self.add_bos = vocab_size, add_bos
        self.ids = {w: 3 + i for i, w in enumerate(WORDS)}
        self.words = {i: w for w, i in self.ids.items()}

    def _id(self, word):
        return self.ids.get(word, 3 + len(WORDS) + zlib.crc32(word.encode()) % (self.vocab_size - 3 - len(WORDS)))

    def __call__(self, text, add_special_tokens=True):
        ids = [self._id(w) for w in text.split()]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(" " + self.words.get(int(i), f"<{int(i)}>") for i in ids
                       if not (skip_special_tokens and int(i) < 3))


@pytest.fixture(scope="module")
def tiny():
    cfg = lconfig.tiny(vocab_size=96)
    return cfg, lmodel.init_params(cfg, jax.random.PRNGKey(0), std=0.3)


def _p(x):
    return np.log(np.asarray(x, np.float32))


# ------------------------------------------------------------------------ pure maths on hand-made logits
def test_mean_target_nll_hand_logits():
    # Two rows, 3 target slots, vocabulary of 4. Logits are log-probabilities (already normalised), plus
    # a constant shift in row 1 that log_softmax must remove.
    p0 = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]]
    p1 = [[0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02], [0.1, 0.2, 0.3, 0.4]]
    logits = jnp.array([_p(p0), _p(p1) + 5.0])
    ids = jnp.array([[3, 1, 0], [2, 0, 0]])
    valid = jnp.array([[1, 1, 0], [1, 0, 0]])  # row 0: 2-token target; row 1: 1 token
    got = np.asarray(metrics.mean_target_nll(logits, ids, valid))
    want = [(-math.log(0.4) - math.log(0.25)) / 2, -math.log(0.25)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a row without any valid slot scores 0 (dummy rows), not nan
    assert float(metrics.mean_target_nll(logits[:1], ids[:1], jnp.zeros((1, 3)))[0]) == 0.0
    np.testing.assert_allclose(np.asarray(metrics.token_nll(logits[0], ids[0])),
                               [-math.log(0.4), -math.log(0.25), -math.log(0.7)], rtol=1e-6)


def test_sequence_target_nll_reads_logits_before_each_target_token():
    # tokens: [BOS, a, b | t1, t2] with the target at positions 3, 4; vocabulary of 4.
    tokens = jnp.array([[1, 2, 3, 0, 2]])
    target_mask = jnp.array([[0, 0, 0, 1, 1]])
    probs = np.full((1, 5, 4), 0.25, np.float32)
    probs[0, 2] = [0.6, 0.2, 0.1, 0.1]   # predicts token 3 (= 0): p 0.6
    probs[0, 3] = [0.1, 0.1, 0.3, 0.5]   # predicts token 4 (= 2): p 0.3
    logits = jnp.asarray(np.log(probs))
    want = (-math.log(0.6) - math.log(0.3)) / 2
    assert float(metrics.sequence_target_nll(logits, tokens, target_mask)[0]) == pytest.approx(want, rel=1e-6)
    # the logits at the last position and before the prompt end do not matter
    changed = logits.at[0, 4].set(jnp.array([9.0, -9, 3, 1])).at[0, 0].set(jnp.array([5.0, 0, 0, 0]))
    assert float(metrics.sequence_target_nll(changed, tokens, target_mask)[0]) == pytest.approx(want, rel=1e-6)


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
    rows, paths = metrics.pack_token_trees(seqs, width=8)
    # trees (1 2), (3 4 4 4), (5 6 7 8 9): first fit in decreasing size
    assert [r.tokens for r in rows] == [(5, 6, 7, 8, 9, 1, 2), (3, 4, 4, 4)]
    assert rows[0].depths == (0, 1, 2, 2, 3, 0, 1) and rows[0].ends == (5, 5, 3, 5, 5, 7, 7)
    assert rows[1].depths == (0, 1, 2, 3) and rows[1].ends == (4, 4, 4, 4)  # 7 is a leaf; 8's subtree holds 9
    assert paths[0] == paths[3] == (0, (0, 1, 2)) and paths[1] == (0, (0, 1, 3, 4)) and paths[4] == (0, (0,))
    assert paths[2] == (0, (5, 6))
    _check_tree_rows(seqs, rows, paths, 8)
    with pytest.raises(ValueError, match="5 tokens does not fit rows of width 4"):
        metrics.pack_token_trees([(1, 2, 3, 4, 5)], width=4)


def test_pack_token_trees_splits_big_trees_and_fills_rows():
    rng = np.random.default_rng(0)
    seqs = [tuple(int(t) for t in rng.integers(0, 3, size=rng.integers(1, 9))) for _ in range(200)]
    rows, paths = metrics.pack_token_trees(seqs, width=16)
    _check_tree_rows(seqs, rows, paths, 16)
    distinct_prefixes = {s[:k] for s in seqs for k in range(1, len(s) + 1)}
    n_tokens = sum(len(r.tokens) for r in rows)
    # a tree bigger than a row is cut, repeating only the cut prefixes; rows are nearly full
    assert len(distinct_prefixes) <= n_tokens < 1.5 * len(distinct_prefixes)
    assert n_tokens / (16 * len(rows)) > 0.85


# ------------------------------------------------------------------------------- aggregation by hand
def test_case_metrics_and_aggregate_by_hand():
    e = math.exp
    c = metrics.case_metrics(
        "c1",
        rewrite_nll=[(1.0, 2.0)],                               # new wins
        paraphrase_nll=[(1.0, 2.0), (3.0, 2.0)],                 # 1 of 2
        neighborhood_nll=[(1.0, 2.0), (2.0, 1.0)])              # true wins on the second only
    assert (c.es, c.ps, c.ns) == (100.0, 50.0, 50.0)
    assert c.em == pytest.approx(100 * (e(-1) - e(-2)))
    assert c.pm == pytest.approx(100 * ((e(-1) - e(-2)) + (e(-3) - e(-2))) / 2)
    assert c.nm == pytest.approx(0.0, abs=1e-12)
    agg = metrics.aggregate([c])
    assert agg.s == pytest.approx(60.0)   # harmonic mean of 100, 50, 50
    assert agg.ge is None and agg.n_cases == 1

    # ties count for nobody; averaged within a case, then over cases; nan (no prompts) left out
    d = metrics.case_metrics("c2", [(2.0, 2.0)], [], [(0.5, 3.0)])
    assert (d.es, d.ns) == (0.0, 0.0) and math.isnan(d.ps) and math.isnan(d.pm)
    agg = metrics.aggregate([c, d])
    assert (agg.es, agg.ps, agg.ns) == (50.0, 50.0, 25.0)
    assert agg.nm == pytest.approx((0.0 + 100 * (e(-3) - e(-0.5))) / 2)
    assert agg.s == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 25))
    assert metrics.harmonic_mean([100, 0, 50]) == 0.0
    assert metrics.aggregate([metrics.case_metrics(0, [(1, 2)], [(1, 2)], [(1, 2)])]).s == 0.0  # NS = 0


def test_plan_buckets():
    lengths = [3, 17, 9, 5, 16, 8, 2, 30]
    buckets = metrics.plan_buckets(lengths, batch_size=2, multiple=8)
    assert sorted(i for b in buckets for i in b.indices) == list(range(8))
    for b in buckets:
        assert len(b.indices) <= 2 and all(lengths[i] <= b.width for i in b.indices)
        assert all(tokenize.bucket(lengths[i], 8) == b.width for i in b.indices)
    assert sorted({b.width for b in buckets}) == [8, 16, 24, 32]


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
    before = metrics.score_tree_rows._cache_size()
    # narrow rows and 2 rows per call: several calls, prefix trees split across rows
    got = metrics.score_pairs(params, cfg, tok, PAIRS, batch_size=2, row_width=16)
    assert metrics.score_tree_rows._cache_size() - before <= 3   # few shapes, whatever the number of rows
    np.testing.assert_allclose(metrics.score_pairs(params, cfg, tok, PAIRS[::-1], batch_size=64)[::-1], got,
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
        want.append(float(metrics.sequence_target_nll(logits, seq, tm)[0]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.std(got) > 0.05  # the pairs are really scored differently


def _requests():
    return (
        EditRequest("The capital of {} is", "France", "London", target_true="Paris", case_id=0,
                    paraphrase_prompts=("the city of France is", "France capital is"),
                    neighborhood_prompts=("The capital of Asia is",),
                    generation_prompts=("France is", "the capital of France")),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French",
                    case_id=1, paraphrase_prompts=("Danielle Darrieux speaks",),
                    neighborhood_prompts=("The capital of Asia is", "Toko Yasuda speaks"),
                    generation_prompts=("Danielle Darrieux speaks",)),
    )


def test_evaluate_matches_scores(tiny):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    reqs = _requests()
    res = metrics.evaluate(params, cfg, tok, reqs, batch_size=4, row_width=16)
    assert [c.case_id for c in res.cases] == [0, 1]
    for r, c in zip(reqs, res.cases):
        for prompts, got in ((( r.filled_prompt,), c.rewrite_nll), (r.paraphrase_prompts, c.paraphrase_nll),
                             (r.neighborhood_prompts, c.neighborhood_nll)):
            pairs = [(p, t) for p in prompts for t in (r.target_new, r.target_true)]
            np.testing.assert_allclose(np.ravel(got), metrics.score_pairs(params, cfg, tok, pairs, 4), atol=2e-5)
        ref = metrics.case_metrics(r.case_id, c.rewrite_nll, c.paraphrase_nll, c.neighborhood_nll)
        assert (c.es, c.ps, c.ns, c.em, c.pm, c.nm) == (ref.es, ref.ps, ref.ns, ref.em, ref.pm, ref.nm)
    assert res.aggregate == metrics.aggregate(res.cases)
    assert res.aggregate.ge is None
    table = metrics.format_before_after(res.aggregate, res.aggregate)
    assert "ES" in table and "change" in table and "0.0" in table
    with pytest.raises(ValueError, match="case 5.*target_true"):
        metrics.evaluate(params, cfg, tok, [EditRequest("{} is", "France", "London", case_id=5)])


def test_evaluate_with_generation(tiny):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    spec = metrics.GenerationSpec(max_new_tokens=12, top_k=5, batch_size=4)
    res = metrics.evaluate(params, cfg, tok, _requests(), batch_size=4, with_generation=True, generation=spec)
    assert all(c.ge is not None and c.ge > 0 for c in res.cases)
    assert res.aggregate.ge == pytest.approx(np.mean([c.ge for c in res.cases]))
    texts = metrics.generate_texts(params, cfg, tok, ["France is", "the capital of France"], spec)
    assert texts[0].startswith("France is ") and 4 < len(texts[1].split()) <= 4 + 12  # specials dropped
    assert texts == metrics.generate_texts(params, cfg, tok, ["France is", "the capital of France"], spec)
    assert "GE" in metrics.format_table({"x": res.aggregate})


# ----------------------------------------------------------------------------------- n-gram entropy
def test_ngram_entropy_known_value():
    # tokens a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert metrics.ngram_entropy("word") == 0.0
    assert metrics.word_tokens("He didn't go, did he?") == ["He", "did", "n't", "go", ",", "did", "he", "?"]
    assert metrics.mean_ngram_entropy(["a b a b", "word"]) == pytest.approx(metrics.ngram_entropy("a b a b") / 2)


def test_ngram_entropy_repetitive_is_lower():
    repetitive = "the cat is the cat is the cat is the cat is the cat is the cat is"
    varied = "the cat sat on a mat while seven dogs barked loudly at passing cars near the old mill"
    assert metrics.ngram_entropy(repetitive) < metrics.ngram_entropy(varied) - 1.0


# ------------------------------------------------------------------------------------------ SmolLM2
def test_smollm2_paris_beats_london(smollm2):
    cfg, params, tok = smollm2
    nll = metrics.score_pairs(params, cfg, tok, [("The capital of France is", "Paris"),
                                                 ("The capital of France is", "London")], batch_size=2)
    assert nll[0] < nll[1] - 1.0
