"""End-to-end truth on the offline SmolLM2: 8 CounterFact cases edited by ROME, MEMIT, EMMET and
AlphaEdit; AlphaEdit also over 32 sequential edits."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxedit.data import counterfact
from jaxedit.editing import covariance, editor, schedule, templates
from jaxedit.eval import independent, metrics
from jaxedit.hparams import preset

LAYER = preset("smollm2-135m", "memit").layers[0]


@pytest.fixture(scope="module")
def world(smollm2, tmp_path_factory, data_dir):
    cfg, params, tok = smollm2
    cache = tmp_path_factory.mktemp("cache")
    hp = preset("smollm2-135m", "memit")
    covs = covariance.preservation_covariance(params, cfg, tok, [LAYER], hp.covariance, data_dir=data_dir,
                                              cache_dir=cache, progress=False)
    cases = counterfact.load_counterfact(data_dir / "counterfact" / "counterfact-edit.json", n=41, seed=0)
    return cfg, params, tok, covs, cache, cases


def efficacy(params, cfg, tok, requests):
    """Per case: 1 if P(target_new) > P(target_true) on the edit prompt."""
    return [c.es / 100 for c in metrics.evaluate(params, cfg, tok, requests).cases]


def snapshot(params):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)


def unchanged(params, before):
    return all(np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)))


@pytest.fixture(scope="module")
def first_8_values(world):
    """MEMIT's values of cases 0-7 on the unedited model (MEMIT, EMMET and AlphaEdit share site,
    templates and layer, so these serve all three)."""
    cfg, params, tok, covs, cache, cases = world
    hp = preset("smollm2-135m", "memit")
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    return editor.edit_values(params, cfg, tok, cases[:8], hp, templates=g)


@pytest.fixture(scope="module")
def memit_edited(world, first_8_values):
    cfg, params, tok, covs, cache, cases = world
    hp = preset("smollm2-135m", "memit")
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    before = snapshot(params)
    vals = first_8_values
    out = {}
    for method in ("memit", "emmet", "alphaedit"):  # same values (site, templates, layer): computed once
        out[method] = editor.edit(params, cfg, tok, cases[:8], preset("smollm2-135m", method), covariances=covs,
                                  templates=g, values=vals)
    assert unchanged(params, before)
    return out


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_batch_of_8_succeeds(world, memit_edited, method):
    cfg, params, tok, _, _, cases = world
    new, report = memit_edited[method]
    before = efficacy(params, cfg, tok, cases[:8])
    after = efficacy(new, cfg, tok, cases[:8])
    assert sum(after) >= 7, (method, before, after, report.summary())
    assert sum(after) > sum(before)


def test_rome_one_at_a_time(world):
    cfg, params, tok, covs, cache, cases = world
    hp = preset("smollm2-135m", "rome")
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    before = snapshot(params)
    # Independent single edits of the same model: their values are optimised together in one batch.
    vals = editor.edit_values(params, cfg, tok, cases[:5], hp, templates=g)
    alone, changes = [], []
    for i, case in enumerate(cases[:5]):
        one = vals.select(i)
        new, _ = editor.edit(params, cfg, tok, [case], hp, covariances=covs, templates=g, values=one)
        alone.append(metrics.evaluate(new, cfg, tok, [case]).cases[0])
        changes.append(independent.change_of(params, new, hp.layers, rank=1))
    assert unchanged(params, before)
    wins = [c.es / 100 for c in alone]
    assert sum(wins) >= 4, wins
    # the same five edits scored in one pass on the unedited model, each case under its own edit
    together = metrics.evaluate(params, cfg, tok, cases[:5], edits=independent.stack_changes(changes)).cases
    for one_pass, separate in zip(together, alone):
        for kind in ("rewrite_nll", "paraphrase_nll", "neighborhood_nll"):
            np.testing.assert_allclose(getattr(one_pass, kind), getattr(separate, kind), rtol=1e-5, atol=1e-5)
        assert (one_pass.es, one_pass.ps, one_pass.ns) == (separate.es, separate.ps, separate.ns)


def test_rome_on_memit_output_keeps_both_edits(world, memit_edited):
    cfg, params, tok, covs, cache, cases = world
    memit_params, _ = memit_edited["memit"]
    hp = preset("smollm2-135m", "rome")
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    both, report = editor.edit(memit_params, cfg, tok, [cases[8]], hp, covariances=covs, templates=g)
    assert efficacy(both, cfg, tok, [cases[8]]) == [1.0], report.summary()
    assert sum(efficacy(both, cfg, tok, cases[:8])) >= 7


def test_sequential_batched_16_in_batches_of_8(world):
    cfg, params, tok, covs, cache, cases = world
    hp = preset("smollm2-135m", "memit")
    hp = hp.replace(value=dataclasses.replace(hp.value, v_num_grad_steps=10))  # cheaper; efficacy is reported
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    final, outcomes = schedule.sequential_batched_edit(
        params, cfg, tok, cases[9:25], hp, covariances=covs, templates=g, batch_size=8, progress=False,
        after_batch=lambda i, p, batch, rep: metrics.evaluate(p, cfg, tok, batch).aggregate.es)
    per_batch = [o.extra for o in outcomes]
    print("per-batch efficacy right after each batch:", per_batch)
    assert len(per_batch) == 2 and all(0 <= e <= 100 for e in per_batch)
    assert np.mean(per_batch) > metrics.evaluate(params, cfg, tok, cases[9:25]).aggregate.es
    assert [o.report.case_ids for o in outcomes] == [tuple(c.case_id for c in cases[9 + 8 * b: 17 + 8 * b])
                                                      for b in range(2)]


def test_alphaedit_sequential_16_edits_keep_earlier_ones(world, first_8_values):
    """16 edits in 2 sequential batches of 8: AlphaEdit carries the earlier batch's keys, so the first
    batch's edits survive the next. The first batch's values are the shared ones of the unedited model."""
    cfg, params, tok, covs, cache, cases = world
    hp = preset("smollm2-135m", "alphaedit")
    g = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    before = snapshot(params)
    first_after_own_batch = []

    def after_batch(index, new_params, batch, report):
        if index == 0:
            first_after_own_batch.extend(efficacy(new_params, cfg, tok, batch))

    final, outcomes = schedule.sequential_batched_edit(params, cfg, tok, cases[:16], hp, covariances=covs,
                                                       templates=g, batch_size=8, after_batch=after_batch,
                                                       first_values=first_8_values, progress=False)
    assert unchanged(params, before)
    assert len(outcomes) == 2 and all(not o.report.warnings for o in outcomes)
    everything = efficacy(final, cfg, tok, cases[:16])
    first_at_end = everything[:8]
    assert sum(first_after_own_batch) >= 7, first_after_own_batch
    assert sum(first_at_end) >= 7, (first_after_own_batch, first_at_end)
    assert sum(everything) >= 14, everything
