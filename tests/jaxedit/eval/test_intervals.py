"""Bootstrap intervals on synthetic per-case results with known answers."""
import numpy as np
import pytest

from jaxedit.eval import intervals, metrics


def synthetic_cases(rng, n, p_es=0.9, p_ps=0.7, p_ns=0.6):
    return [{"case_id": i, "es": 100.0 * (rng.random() < p_es), "ps": 100.0 * (rng.random() < p_ps),
             "ns": 100.0 * (rng.random() < p_ns), "em": rng.normal(50, 10), "pm": rng.normal(20, 10),
             "nm": rng.normal(0, 5)} for i in range(n)]


def test_estimate_is_the_library_aggregate_with_s_recomputed():
    cases = synthetic_cases(np.random.default_rng(0), 40)
    got = intervals.bootstrap(cases, n_resamples=500)
    want = metrics.aggregate([metrics.CaseMetrics(**c) for c in cases])
    for m in intervals.WITH_S:
        assert got[m].estimate == pytest.approx(getattr(want, m))
        assert got[m].low <= got[m].estimate <= got[m].high
    assert got["s"].estimate == pytest.approx(metrics.harmonic_mean([want.es, want.ps, want.ns]))


def test_intervals_cover_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits = {"es": 0, "ns": 0, "em": 0}
    trials = 200
    for seed in range(trials):
        cases = synthetic_cases(rng, 60)
        got = intervals.bootstrap(cases, n_resamples=400, seed=seed)
        for m, truth in (("es", 90.0), ("ns", 60.0), ("em", 50.0)):
            hits[m] += got[m].low <= truth <= got[m].high
    for m, h in hits.items():  # 95% nominal; percentile intervals at n = 60 run slightly narrow
        assert 0.88 <= h / trials <= 0.99, (m, h / trials)


def test_paired_interval_of_identical_inputs_is_zero_and_a_real_shift_is_seen():
    rng = np.random.default_rng(2)
    before = synthetic_cases(rng, 50, p_ns=0.7)
    same = intervals.paired_difference(before, before, n_resamples=300)
    assert all((i.estimate, i.low, i.high) == (0.0, 0.0, 0.0) for i in same.values())
    after = [dict(c, ns=0.0 if i % 3 == 0 else c["ns"]) for i, c in enumerate(before)]  # NS drops
    diff = intervals.paired_difference(after, before, n_resamples=1000)
    assert diff["ns"].high < 0 and diff["es"].low == diff["es"].high == 0.0
    with pytest.raises(ValueError, match="same cases"):
        intervals.paired_difference(after[:-1], before)


def test_paired_cases_match_by_case_id():
    a = [{"case_id": i, "es": 1.0} for i in (3, 1, 2)]
    b = [{"case_id": i, "es": 0.0} for i in (1, 2, 5)]
    after, before = intervals.paired_cases(a, b)
    assert [c["case_id"] for c in after] == [1, 2] == [c["case_id"] for c in before]
