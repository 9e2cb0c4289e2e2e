"""The paired comparisons of the sweeps' findings, on synthetic records with known answers."""
from experiments import paired


def _cases(ids, es, ns):
    return [{"case_id": i, "es": es, "ps": es, "ns": ns, "em": 0.0, "pm": 0.0, "nm": 0.0} for i in ids]


def _label(key):
    return key["method"].upper()


def test_batch_rows_pair_nested_cases_and_give_verdicts():
    cells = [
        {"key": {"method": "memit", "batch_size": 4}, "cases": _cases(range(4), 100.0, 100.0),
         "before_cases": _cases(range(4), 0.0, 100.0)},
        {"key": {"method": "memit", "batch_size": 8},
         "cases": _cases(range(4), 100.0, 0.0) + _cases(range(4, 8), 100.0, 100.0)},
        {"key": {"method": "emmet", "batch_size": 4}, "cases": _cases(range(4), 100.0, 100.0)},
    ]
    rows = {r[0]: r for r in paired.batch_rows(cells, _label)}
    unedited = rows["MEMIT B=4 − unedited"]
    assert unedited[1] == 4 and unedited[2].startswith("+100.0 [+100.0, +100.0]") and unedited[-1] == "higher"
    nested = rows["MEMIT B=8 − B=4 (the B=4 cases)"]
    assert nested[1] == 4  # only the cases both share
    assert nested[4].startswith("-100.0") and nested[-2] == "lower"
    same = rows["EMMET − MEMIT at B=4"]
    assert all(x.startswith("+0.0 [+0.0, +0.0]") for x in same[2:6]) and same[-1] == "cannot tell"


def test_layer_and_sequential_rows():
    layer = [{"key": {"method": "rome", "layer": l}, "aggregate": {"s": s}, "cases": _cases(range(6), es, 50.0),
              "before_cases": _cases(range(6), 0.0, 50.0)} for l, s, es in ((0, 80.0, 100.0), (3, 70.0, 100.0), (5, 10.0, 0.0))]
    labels = [r[0] for r in paired.layer_rows(layer, _label)]
    assert labels == ["ROME layer 0 − unedited", "ROME layer 3 − unedited", "ROME layer 5 − unedited",
                      "ROME layer 0 (best S) − layer 3", "ROME layer 0 (best S) − layer 5"]
    seq = [{"key": {"method": "memit", "batch_size": b}, "final_cases": _cases(range(5), es, 50.0)}
           for b, es in ((1, 100.0), (5, 60.0))]
    (row,) = paired.sequential_rows(seq, _label)
    assert row[0] == "MEMIT batches of 1 − batches of 5" and row[2].startswith("+40.0 [+40.0, +40.0]")


def test_layer_rows_compare_rome_with_memit_at_each_ones_best_and_middle_layer():
    def cell(method, layer, s, es):
        return {"key": {"method": method, "layer": layer}, "aggregate": {"s": s}, "cases": _cases(range(6), es, 50.0)}
    layer = [cell("memit", 0, 90.0, 100.0), cell("memit", 1, 50.0, 50.0), cell("memit", 2, 40.0, 100.0),
             cell("rome", 0, 60.0, 100.0), cell("rome", 1, 80.0, 0.0), cell("rome", 2, 30.0, 0.0)]
    rows = {r[0]: r for r in paired.layer_rows(layer, _label)}
    # MEMIT's best layer is 0, ROME's is 1; the middle of 0-2 is 1 (no duplicate row)
    assert [k for k in rows if k.startswith("ROME − MEMIT")] == ["ROME − MEMIT at layer 0", "ROME − MEMIT at layer 1"]
    assert rows["ROME − MEMIT at layer 0"][2].startswith("+0.0 [+0.0, +0.0]")
    assert rows["ROME − MEMIT at layer 1"][2].startswith("-50.0 [-50.0, -50.0]")
