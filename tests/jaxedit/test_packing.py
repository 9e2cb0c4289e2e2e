"""Bucketing and first-fit-decreasing packing."""
import pytest

from jaxedit import packing


def test_plan_buckets():
    lengths = [3, 17, 9, 5, 16, 8, 2, 30]
    buckets = packing.plan_buckets(lengths, batch_size=2, multiple=8)
    assert sorted(i for b in buckets for i in b.indices) == list(range(8))
    for b in buckets:
        assert len(b.indices) <= 2 and all(lengths[i] <= b.width for i in b.indices)
        assert all(packing.bucket(lengths[i], 8) == b.width for i in b.indices)
    assert sorted({b.width for b in buckets}) == [8, 16, 24, 32]


def test_first_fit_decreasing_places_largest_first_into_the_first_bin_with_room():
    bins = packing.first_fit_decreasing([3, 5, 2, 4, 1, 5], capacity=8)
    # sorted: 5 (1), 5 (5), 4 (3), 3 (0), 2 (2), 1 (4)
    assert bins == [[1, 0], [5, 2, 4], [3]]
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([3, 5, 2, 4, 1, 5][i] for i in b) <= 8 for b in bins)
    assert packing.first_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match="does not fit bins of capacity 4"):
        packing.first_fit_decreasing([2, 5], 4)


def test_bucket_rounds_up_to_a_multiple():
    assert [packing.bucket(n, 8) for n in (0, 1, 8, 9, 17)] == [8, 8, 8, 16, 24]


def test_geometric_buckets_are_few_and_waste_at_most_a_third():
    sizes = sorted({packing.bucket_geometric(n, 8) for n in range(1, 1025)})
    assert sizes[:6] == [8, 12, 16, 24, 32, 48] and len(sizes) == 15
    assert all(n <= packing.bucket_geometric(n, 8) <= max(8, 1.5 * n) for n in range(1, 1025))
    assert [packing.bucket_geometric(n, 1) for n in (1, 2, 3, 5, 7, 9)] == [1, 2, 3, 6, 8, 12]
