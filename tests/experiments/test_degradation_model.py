"""The degradation model reads only its fit split: the held-out batch sizes are predicted, never fitted."""
import math
import random

import numpy as np
import pytest

from experiments import degradation_model as dm

SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
HELD = (512, 2048)


def _cell(method, layer, b, rng):
    cost = 1e-3 * b ** 1.2 * (1.5 if method == "emmet" else 1.0)
    ns_loss = 4.0 * math.log10(cost) + 14.0 + rng.normal(0, 0.3)  # NS loss grows with log cost
    return {"key": {"method": method, "layer": layer, "batch_size": b, "batch_index": 0}, "d_ff": 1536,
            "aggregate": {"es": 100.0 - 0.01 * b, "ps": 90.0 - 0.002 * b, "ns": 70.0 - ns_loss},
            "before": {"es": 20.0, "ps": 25.0, "ns": 70.0},
            "diagnostics": {"preservation_cost": cost, "residual": 0.1 + 1e-4 * b, "gram_min_eigenvalue": 100.0 / b,
                            "key_norm": 50.0, "effective_rank": b * (0.9 - 0.1 * math.log10(b)), "n_keys": b,
                            "participation_ratio": 0.8 * b,
                            "coherence": 0.9, "mean_coherence": 0.3 + rng.uniform(0, 0.05), "delta_norm": 20 * b ** 0.5,
                            "top_share": {"0.01": 0.05, "0.1": 0.3 + rng.uniform(0, 0.01)}}}


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return dm.rows_from_cells([_cell(m, l, b, rng) for m in ("memit", "emmet") for l in (3, 9) for b in SIZES])


def _same_fit(a, b):
    return (a.intercept == b.intercept and a.slope == b.slope and np.array_equal(a.boot, b.boot)
            and a.rho == b.rho and a.rho_interval == b.rho_interval and a.n_fit == b.n_fit)


def test_rows_hold_losses_and_predictors(rows):
    r = rows[0]
    assert r["ps_loss"] == pytest.approx(100 - (90 - 0.002 * 16)) and r["es_loss"] == pytest.approx(0.16)
    assert r["log2 B"] == 4 and r["B / d_ff"] == pytest.approx(16 / 1536)
    assert r["log10 preservation cost"] == pytest.approx(math.log10(1e-3 * 16 ** 1.2))


def test_shuffling_the_held_out_results_leaves_the_fitted_model_unchanged(rows):
    chosen, _ = dm.choose_predictor(rows, "ns_loss", HELD)
    fit = dm.fit_line(rows, "ns_loss", chosen, HELD, n_resamples=200)
    assert fit.fit_sizes == (16, 32, 64, 128, 256, 1024) and fit.n_fit == 24
    held = [i for i, r in enumerate(rows) if r["batch_size"] in HELD]
    for trial in range(3):
        shuffled = [dict(r) for r in rows]
        perm = random.Random(trial).sample(held, len(held))
        for name in ("ns_loss", *dm.PREDICTORS):  # held-out losses and diagnostics, moved between rows
            values = [rows[j][name] for j in perm]
            for i, v in zip(held, values):
                shuffled[i][name] = v
        for i in held[:2]:
            shuffled[i]["ns_loss"] = 1e6  # and some replaced outright
        # and the held-out rows moved to random places among the fit rows (whose order is kept)
        reordered, where = [r for r in shuffled if r["batch_size"] not in HELD], random.Random(trial)
        for r in (shuffled[i] for i in held):
            reordered.insert(where.randrange(len(reordered) + 1), r)
        assert dm.choose_predictor(reordered, "ns_loss", HELD)[0] == chosen
        assert _same_fit(dm.fit_line(reordered, "ns_loss", chosen, HELD, n_resamples=200), fit)
    # ... while the fit split's own results do move it (the check above can fail)
    moved = [dict(r) for r in rows]
    fit_idx = [i for i, r in enumerate(rows) if r["batch_size"] not in HELD]
    for i, j in zip(fit_idx, random.Random(0).sample(fit_idx, len(fit_idx))):
        moved[i]["ns_loss"] = rows[j]["ns_loss"]
    assert not _same_fit(dm.fit_line(moved, "ns_loss", chosen, HELD, n_resamples=200), fit)


def test_held_out_sizes_are_predicted_within_their_intervals(rows):
    models = dm.degradation_models(rows, HELD, n_resamples=300)
    ns = models["ns_loss"]
    chosen = next(k for k in ns if k != "log2 B")
    check = ns[chosen]
    assert check.fit.rho > 0.9 and check.fit.rho_interval[0] > 0.5
    assert len(check.rows) == 8 and check.covered >= 0.75 and check.rmse < 1.5
    est, lo, hi = check.fit.predict(math.log10(1e-3 * 512 ** 1.2))
    assert lo < est < hi
    assert check.fit.onset(check.fit.intercept) == pytest.approx(0.0)


def test_too_few_fit_rows_is_an_error(rows):
    with pytest.raises(ValueError, match="at least 3 are needed"):
        dm.fit_line(rows, "ns_loss", "coherence", SIZES)


def test_summary_section_fits_and_checks_the_held_out_sizes(tmp_path):
    from experiments import open_questions_summary

    rng = np.random.default_rng(1)
    cells = [{**_cell(m, l, b, rng), "batch_per_d_ff": b / 1536,
              "paired": {k: [0.0, -1.0, 1.0] for k in ("es", "ps", "ns")}}
             for m in ("memit", "emmet") for l in (3, 9) for b in SIZES]
    text = open_questions_summary.batch_degradation(cells, tmp_path, HELD, 2.0, 100)
    assert "| ns_loss | log10 preservation cost |" in text  # the chosen diagnostic for NS
    assert text.count("| ns_loss | MEMIT |") == 4  # held-out predictions: 2 layers x B = 512, 2048
    assert "Where degradation starts" in text and "MEMIT L3: B >= " in text
    assert (tmp_path / "batch_degradation.png").stat().st_size > 0
