"""The resumable JSONL log: torn last lines, repair before appending, latest complete attempts, the
one-writer lock, and the several writers of a per-process run."""
import json
from pathlib import Path

import pytest

from experiments import records
from experiments import results_log
from jaxedit import testing

ROOT = Path(__file__).resolve().parents[2]


def _write(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_read_jsonl_drops_truncated_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    _write(p, [{"a": 1}, {"a": 2}], tail=b'{"a": 3, "b": [1, 2')
    assert results_log.read_jsonl(p) == [{"a": 1}, {"a": 2}]
    assert p.read_bytes().endswith(b'[1, 2')  # not repaired unless asked


def test_read_jsonl_truncated_line_that_parses_is_still_dropped(tmp_path):
    # a torn write may cut a record where the prefix happens to be valid JSON ("12" of "123")
    p = tmp_path / "r.jsonl"
    _write(p, [{"a": 1}], tail=b"12")
    assert results_log.read_jsonl(p) == [{"a": 1}]


def test_results_log_repairs_then_appends_on_a_fresh_line(tmp_path):
    p = tmp_path / "r.jsonl"
    _write(p, [{"type": "cell", "key": {"x": 1}}], tail=b'{"type": "cell", "key": {"x"')
    log = results_log.ResultsLog(p)
    assert log.is_finished({"x": 1}) and not log.is_finished({"x": 2})
    log.append({"type": "cell", "key": {"x": 2}})
    lines = p.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    again = results_log.ResultsLog(p)
    assert [r["key"]["x"] for r in again.records] == [1, 2]
    assert again.finished() == {results_log.key_id({"x": 1}), results_log.key_id({"x": 2})}


def test_malformed_complete_line_is_skipped(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n{"a": 2}\n')
    assert results_log.read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_key_id_is_order_independent():
    assert results_log.key_id({"a": 1, "b": 2}) == results_log.key_id({"b": 2, "a": 1})


def test_latest_complete_ignores_interrupted_and_superseded_attempts():
    key, other = {"m": "memit", "b": 2}, {"m": "emmet", "b": 2}
    recs = [
        {"type": "batch", "key": key, "attempt": "A", "batch_index": 0},  # interrupted attempt A
        {"type": "batch", "key": key, "attempt": "B", "batch_index": 0},
        {"type": "batch", "key": key, "attempt": "B", "batch_index": 1},
        {"type": "cell", "key": key, "attempt": "B"},
        {"type": "batch", "key": other, "attempt": "C", "batch_index": 0},  # never finished
    ]
    cells, batches = results_log.latest_complete(recs)
    assert list(cells) == [results_log.key_id(key)]
    assert [(b["attempt"], b["batch_index"]) for b in batches[results_log.key_id(key)]] == [("B", 0), ("B", 1)]


def test_aggregate_cases_matches_harmonic_mean():
    rows = [{"case_id": 1, "es": 100.0, "ps": 50.0, "ns": 100.0, "em": 1.0, "pm": 0.5, "nm": 0.1},
            {"case_id": 2, "es": 100.0, "ps": 100.0, "ns": 50.0, "em": 1.0, "pm": 0.5, "nm": None}]
    a = records.aggregate_cases(rows)
    assert a["es"] == 100.0 and a["ps"] == 75.0 and a["ns"] == 75.0 and a["nm"] == 0.1
    assert abs(a["s"] - 3 / (1 / 100 + 2 / 75)) < 1e-9


def test_word_hash_tokenizer():
    tok = testing.WordTokenizer(64)
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6 and all(3 <= i < 64 for i in ids[1:])
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == tok("Paris", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).split() == "The capital of France is".split()


def test_malformed_lines_are_moved_aside_on_resume(tmp_path, caplog):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"type": "cell", "key": {"x": 1}}\nnot json\n[1, 2]\n{"type": "cell", "key": {"x": 2}}\n"a"\n'
                  b'{"type": "cell", "key"')
    with caplog.at_level("WARNING"):
        log = results_log.ResultsLog(p)
    assert [r["key"]["x"] for r in log.records] == [1, 2]
    assert p.read_bytes() == b'{"type": "cell", "key": {"x": 1}}\n{"type": "cell", "key": {"x": 2}}\n'
    rejected = p.with_name("r.jsonl.rejected")
    assert rejected.read_bytes() == b'not json\n[1, 2]\n"a"\n'
    for n in (2, 3, 5):
        assert f"{p}:{n}:" in caplog.text
    log.append({"type": "cell", "key": {"x": 3}})
    again = results_log.ResultsLog(p)  # nothing left to move aside
    assert [r["key"]["x"] for r in again.records] == [1, 2, 3]
    assert rejected.read_bytes() == b'not json\n[1, 2]\n"a"\n'


def test_a_second_process_is_refused_while_the_first_holds_the_file(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "r.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments import results_log; "
         f"results_log.ResultsLog({str(p)!r}); print('holding', flush=True); time.sleep(600)"],
        cwd=results_log.Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        try:
            results_log.ResultsLog(p)
        except results_log.ResultsFileInUse as e:
            message = str(e)
        else:
            raise AssertionError("a second writer was let in")
        assert str(p) in message and f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    results_log.ResultsLog(p).append({"type": "cell", "key": {"x": 1}})  # a killed holder lets go
    assert [r["key"] for r in results_log.read_jsonl(p)] == [{"x": 1}]


def test_writers_of_a_per_process_run_append_each_cell_once(tmp_path):
    p = tmp_path / "r.jsonl"
    _write(p, [{"type": "cell", "key": {"x": 0}}], tail=b'{"type": "cell", "key": {"x"')  # a torn write
    first = results_log.ResultsLog(p, share=(0, 2))  # the file's first writer repairs it
    assert p.read_bytes() == b'{"type": "cell", "key": {"x": 0}}\n'
    second = results_log.ResultsLog(p, share=(1, 2))
    assert first.append({"type": "cell", "key": {"x": 1}}) is not None
    assert second.append({"type": "batch", "key": {"x": 2}, "batch_index": 0}) is not None
    assert second.append({"type": "cell", "key": {"x": 1}}) is None  # recorded by the other writer
    assert second.is_finished({"x": 1})  # and now known to this one
    with open(p, "ab") as f:  # a writer killed in the middle of its line
        f.write(b'{"type": "cell", "key": {"x": 3')
    assert second.append({"type": "cell", "key": {"x": 2}}) is not None
    recs = results_log.read_jsonl(p)
    assert [r["key"]["x"] for r in recs if r["type"] == "cell"] == [0, 1, 2]
    assert p.read_bytes().split(b"\n")[-3] == b'{"type": "cell", "key": {"x": 3'  # ended, kept apart
    with pytest.raises(results_log.ResultsFileInUse, match="a writer of a per-process run"):
        results_log.ResultsLog(p)  # a one-writer program while the run's writers hold the file
    with pytest.raises(ValueError, match="write must be True"):
        results_log.ResultsLog(tmp_path / "x.jsonl", write=False, share=(0, 1))


def test_a_one_writer_program_keeps_out_the_writers_of_a_per_process_run(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "r.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments import results_log; "
         f"results_log.ResultsLog({str(p)!r}); print('holding', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(results_log.ResultsFileInUse, match="only writer"):
            results_log.ResultsLog(p, share=(0, 2))
    finally:
        holder.kill()
        holder.wait()


_APPENDER = """
import sys
from experiments import results_log
log = results_log.ResultsLog(sys.argv[1], share=(int(sys.argv[2]), 2))
for x in range(30):
    log.append({"type": "batch", "key": {"x": x}, "by": sys.argv[2], "pad": "." * 500})
    log.append({"type": "cell", "key": {"x": x}, "by": sys.argv[2], "pad": "." * 500})
"""


def test_two_writers_appending_at_once_neither_corrupt_nor_duplicate(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "r.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(p), str(i)], cwd=ROOT) for i in (0, 1)]
    assert [q.wait(timeout=120) for q in procs] == [0, 0]
    lines = p.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # every line a whole record
    recs = results_log.read_jsonl(p)
    assert sorted(r["key"]["x"] for r in recs if r["type"] == "cell") == list(range(30))  # each cell once
    assert len([r for r in recs if r["type"] == "batch"]) == 60
