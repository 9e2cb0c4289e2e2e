"""The bfloat16-against-float32 comparison counts differing decisions case by case."""
import numpy as np
import pytest

from experiments import precision


def _cell(dtype, tmp_path, cases, before, delta, nll):
    np.save(tmp_path / f"d_{dtype}.npy", np.asarray(delta, np.float32))
    row = lambda i, d: {"case_id": i, "es": d[0], "ps": d[1], "ns": d[2], "em": 0.5, "pm": 0.25, "nm": 0.1}
    agg = {"es": 100.0, "ps": 50.0, "ns": 75.0, "s": 70.0, "em": 0.5, "pm": 0.2, "nm": 0.1, "n_cases": len(cases)}
    return {"aggregate": agg, "before": agg, "cases": [row(i, d) for i, d in enumerate(cases)],
            "before_cases": [row(i, d) for i, d in enumerate(before)], "delta_norm": 1.0,
            "delta_file": f"d_{dtype}.npy", "value_nll": nll,
            "value_steps": [3, 5, 5] if dtype == "float32" else [3, 4, 5],
            "stage_seconds": {"values": 10.0, "keys": 1.0, "solve": 0.5, "scoring": 2.0, "c0": 3.0}}


def test_compare_counts_differing_decisions_per_model(tmp_path):
    same = [(100.0, 100.0, 100.0), (100.0, 0.0, 100.0), (100.0, 100.0, 0.0)]
    flipped = [(100.0, 100.0, 100.0), (100.0, 100.0, 0.0), (100.0, 100.0, 0.0)]  # case 1: PS and NS
    cells = {"float32": _cell("float32", tmp_path, same, same, [[1.0, 0.0]], [1.0, 2.0, 4.0]),
             "bfloat16": _cell("bfloat16", tmp_path, flipped, same, [[1.0, 0.1]], [1.0, 2.2, 4.0])}
    text = precision.compare(cells, tmp_path)
    edited = next(line for line in text.splitlines() if line.startswith("| bfloat16 | edited"))
    unedited = next(line for line in text.splitlines() if line.startswith("| bfloat16 | unedited"))
    assert "2 of 9 (1 PS, 1 NS) | 1 |" in edited
    assert "| 1 of 3 | 0.200 | 0.100 |" in edited  # one request's steps; NLL 2.0 -> 2.2; |dW - dW_ref| / |dW_ref|
    assert "0 of 9 | 0 |" in unedited
    cells["bfloat16"]["before_cases"] = cells["bfloat16"]["before_cases"][:2]
    with pytest.raises(ValueError, match="scored different cases"):
        precision.compare(cells, tmp_path)
