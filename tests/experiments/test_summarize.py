"""summarize: markdown tables and PNG plots from small synthetic JSONL files."""
import math
import json

import pytest

from experiments import summarize


def _agg(es, ps, ns, n=4):
    s = 3 / (1 / es + 1 / ps + 1 / ns)
    return {"n_cases": n, "es": es, "ps": ps, "ns": ns, "s": s, "em": 1.0, "pm": 0.5, "nm": 0.2}


def _dump(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "cell", "key"')  # + torn line


def test_summarize_writes_tables_and_plots(tmp_path):
    layer = [{"type": "cell", "attempt": f"a{m}{l}", "key": {"sweep": "layer", "model": "m", "method": m, "layer": l, "n": 4},
              "aggregate": _agg(100, 50 + l, 90 - l)} for m in ("rome", "memit") for l in (0, 1, 2)]
    layer.append({**layer[0], "attempt": "again", "aggregate": _agg(100, 99, 99)})  # a re-run: the last one wins
    batch = [{"type": "cell", "attempt": f"b{m}{b}", "key": {"sweep": "batch", "model": "m", "method": m, "layer": 3,
                                                             "batch_size": b},
              "aggregate": _agg(99, 60, 80 - b / 4), "before": _agg(10, 10, 90)} for m in ("memit", "emmet") for b in (16, 64)]
    seq = []
    for m in ("memit", "emmet"):
        for b in (1, 2, 4):
            key = {"sweep": "sequential", "model": "m", "method": m, "layer": 3, "batch_size": b, "total": 4}
            seq.append({"type": "batch", "key": key, "attempt": "stale", "batch_index": 0, "edits_so_far": b,
                        "after_batch": _agg(1, 1, 1)})  # an interrupted attempt: must not show
            for i in range(4 // b):
                seq.append({"type": "batch", "key": key, "attempt": f"s{m}{b}", "batch_index": i,
                            "edits_so_far": (i + 1) * b, "after_batch": _agg(100, 70, 80)})
            seq.append({"type": "cell", "key": key, "attempt": f"s{m}{b}", "n_batches": 4 // b,
                        "final_all": _agg(90 - b, 60, 70), "after_batch_mean": _agg(100, 70, 80),
                        "before": _agg(20, 30, 95)})
    for name, recs in (("layer", layer), ("batch", batch), ("sequential", seq)):
        _dump(tmp_path / f"{name}.jsonl", recs)
    out = tmp_path / "out"
    parts = summarize.summarize(tmp_path / "layer.jsonl", tmp_path / "batch.jsonl", tmp_path / "sequential.jsonl", out)
    assert set(parts) == {"layer", "batch", "sequential"}
    for name in ("layer_sweep", "batch_sweep", "sequential_sweep"):
        assert (out / f"{name}.md").stat().st_size > 100
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layer_md = (out / "layer_sweep.md").read_text()
    assert layer_md.count("| ROME | 0 |") == 1 and "| ROME | 0 | 4 | 100.0 | 99.0 | 99.0 |" in layer_md
    seq_md = (out / "sequential_sweep.md").read_text()
    assert "| 1.0 | 1.0 | 1.0 |" not in seq_md  # the stale attempt's batch is not shown
    assert seq_md.count("| MEMIT | 1 | 0 | 1 |") == 1
    assert seq_md.count("| unedited | – | 4 | 0 | the same cases | 20.0 | 30.0 | 95.0 |") == 1
    assert "unedited" in (out / "batch_sweep.md").read_text()
    assert (out / "summary.md").exists()


def test_summarize_with_no_files(tmp_path):
    assert summarize.summarize(tmp_path / "no1", tmp_path / "no2", None, tmp_path / "out") == {}


def test_batch_windows_average_consecutive_batches():
    batches = [{"batch_index": i, "edits_so_far": i + 1,
                "after_batch": {"es": 100.0, "ns": 100.0 * (i % 2), "ps": None}} for i in range(10)]
    alone = summarize.batch_windows(batches[:3], max_windows=8)
    assert [(w["first"], w["last"], w["edits_so_far"]) for w in alone] == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    assert [w["after_batch"]["ns"] for w in alone] == [0.0, 100.0, 0.0]
    grouped = summarize.batch_windows(batches, max_windows=4)
    assert [(w["first"], w["last"]) for w in grouped] == [(0, 1), (2, 4), (5, 7), (8, 9)]
    assert [w["after_batch"]["ns"] for w in grouped] == [50.0, 100 / 3, 200 / 3, 50.0]
    assert grouped[-1]["edits_so_far"] == 10 and math.isnan(grouped[0]["after_batch"]["ps"])


def test_window_s_is_the_harmonic_mean_of_the_window_aggregates():
    """A window of single-edit batches ES 100 / PS 100 / NS (100, 0): NS 50, S = HM(100, 100, 50) = 75,
    not the mean of the batches' S (100 and 0)."""
    def batch(i, ns):
        case = {"case_id": i, "es": 100.0, "ps": 100.0, "ns": ns, "em": 1.0, "pm": 1.0, "nm": 1.0}
        s = 0.0 if ns == 0 else 100.0
        return {"batch_index": i, "edits_so_far": i + 1, "cases": [case],
                "after_batch": {"es": 100.0, "ps": 100.0, "ns": ns, "s": s, "n_cases": 1}}

    (window,) = summarize.batch_windows([batch(0, 100.0), batch(1, 0.0)], max_windows=1)
    assert window["after_batch"]["ns"] == 50.0
    assert window["after_batch"]["s"] == pytest.approx(75.0)
    without_cases = [{k: v for k, v in batch(i, ns).items() if k != "cases"} for i, ns in ((0, 100.0), (1, 0.0))]
    (window,) = summarize.batch_windows(without_cases, max_windows=1)
    assert window["after_batch"]["s"] == pytest.approx(75.0)


def test_cells_with_cases_get_bootstrap_intervals(tmp_path):
    cases = [{"case_id": i, "es": 100.0, "ps": 100.0 * (i % 2), "ns": 100.0, "em": 1.0, "pm": 1.0, "nm": 1.0}
             for i in range(10)]
    layer = [{"type": "cell", "attempt": "a", "key": {"sweep": "layer", "model": "m", "method": "memit", "layer": 0,
                                                      "n": 10},
              "aggregate": _agg(100, 50, 100), "cases": cases}]
    _dump(tmp_path / "layer.jsonl", layer)
    out = tmp_path / "out"
    summarize.summarize(tmp_path / "layer.jsonl", tmp_path / "none.jsonl", tmp_path / "none2.jsonl", out)
    text = (out / "layer_sweep.md").read_text()
    row = next(l for l in text.splitlines() if l.startswith("| MEMIT | 0 |"))
    assert "100.0 [100.0, 100.0]" in row  # ES: every case 100
    low, high = (float(x) for x in row.split("|")[5].split("[")[1].rstrip("] ").split(","))
    assert low < 50.0 < high  # PS: 5 of 10 cases
