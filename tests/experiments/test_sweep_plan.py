"""How --cell_parallelism=per_process deals a sweep's cells out to processes."""
import pytest

from experiments.sweep_plan import share_of


def test_shares_are_disjoint_cover_every_cell_and_keep_groups_together():
    cells = [(m, layer) for layer in range(30) for m in ("memit", "rome")]
    cost = lambda c: 30 - c[1]
    shares = [share_of(cells, i, 8, group=lambda c: c[1], cost=cost) for i in range(8)]
    assert sorted(c for s in shares for c in s) == sorted(cells)  # every cell, once
    for s in shares:
        assert s == [c for c in cells if c in s]  # in the sweep's order
        layers = {c[1] for c in s}
        assert all((m, layer) in s for layer in layers for m in ("memit", "rome"))  # a layer's cells together
    loads = [sum(cost(c) for c in s) for s in shares]
    assert max(loads) - min(loads) <= 2 * 30  # dealt largest first to the least loaded: within one group
    # the same cells give the same shares in every process and every rerun
    assert shares == [share_of(list(cells), i, 8, group=lambda c: c[1], cost=cost) for i in range(8)]


def test_one_process_runs_everything_and_more_processes_than_groups_leave_some_idle():
    cells = [("memit", 16), ("emmet", 16), ("memit", 64), ("emmet", 64)]
    assert share_of(cells, 0, 1) == cells
    shares = [share_of(cells, i, 3, group=lambda c: c[1], cost=lambda c: c[1]) for i in range(3)]
    assert shares == [[("memit", 64), ("emmet", 64)], [("memit", 16), ("emmet", 16)], []]
    with pytest.raises(ValueError, match="process_id 3 must be in 0..2"):
        share_of(cells, 3, 3)
