"""CounterFact metrics: aggregation by hand, and evaluate() against the scores it is built from."""
import math

import numpy as np
import pytest

from jaxedit.eval import generation, metrics, scoring, tables
from jaxedit.requests import EditRequest
from tests.jaxedit.eval.vocabulary import word_tokenizer as WordTokenizer


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
            np.testing.assert_allclose(np.ravel(got), scoring.score_pairs(params, cfg, tok, pairs, 4), atol=2e-5)
        ref = metrics.case_metrics(r.case_id, c.rewrite_nll, c.paraphrase_nll, c.neighborhood_nll)
        assert (c.es, c.ps, c.ns, c.em, c.pm, c.nm) == (ref.es, ref.ps, ref.ns, ref.em, ref.pm, ref.nm)
    assert res.aggregate == metrics.aggregate(res.cases)
    assert res.aggregate.ge is None
    table = tables.format_before_after(res.aggregate, res.aggregate)
    assert "ES" in table and "change" in table and "0.0" in table
    with pytest.raises(ValueError, match="case 5.*target_true"):
        metrics.evaluate(params, cfg, tok, [EditRequest("{} is", "France", "London", case_id=5)])


def test_evaluate_with_generation(tiny):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    spec = generation.GenerationSpec(max_new_tokens=12, top_k=5, batch_size=4)
    res = metrics.evaluate(params, cfg, tok, _requests(), batch_size=4, with_generation=True, generation=spec)
    assert all(c.ge is not None and c.ge > 0 for c in res.cases)
    assert res.aggregate.ge == pytest.approx(np.mean([c.ge for c in res.cases]))
    texts = generation.generate_texts(params, cfg, tok, ["France is", "the capital of France"], spec)
    assert texts[0].startswith("France is ") and 4 < len(texts[1].split()) <= 4 + 12  # specials dropped
    assert texts == generation.generate_texts(params, cfg, tok, ["France is", "the capital of France"], spec)
    assert "GE" in tables.format_table({"x": res.aggregate})
