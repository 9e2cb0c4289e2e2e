"""The resumable JSONL results log of the experiment programs.

Every program appends one JSON record per finished unit of work to its --out file, written with a
single write() on an O_APPEND descriptor, flushed and fsynced at once. On (re)start the file is read
back: a last line without its newline (a crash mid-write) is dropped and the file is cut back to the
last complete line before anything new is appended, so a record is never half-kept and never
duplicated. Each record carries `key` (what cell it belongs to, including the settings that define
the run: model, case count, seed...) and `attempt` (a random id per program run and cell), so readers
can tell a finished cell (a record with "type": "cell") from the left-overs of an interrupted one
(per-batch records of an attempt that never wrote its "cell" record).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from experiments.program import FLAGS


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Complete records of a JSONL file.

    A last line without its trailing newline is a torn write: it is ignored (and, with repair=True,
    cut off the file so that later appends start on a fresh line). A complete line that is not valid
    JSON is skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        logging.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s:%d: skipping a malformed line", path, n)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def key_id(key: Mapping) -> str:
    """Canonical string of a cell key (for set membership)."""
    return json.dumps(key, sort_keys=True, default=str)


class ResultsLog:
    """Append-only JSONL results of one program (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_jsonl(self.path, repair=True)

    def finished(self) -> set[str]:
        """key_id of every cell with a final ("type": "cell") record."""
        return {key_id(r["key"]) for r in self.records if r.get("type") == "cell" and "key" in r}

    def is_finished(self, key: Mapping) -> bool:
        return key_id(key) in self.finished()

    def append(self, record: Mapping) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(json.loads(line))
        if record.get("type") == "cell" and getattr(FLAGS, "test_pause_after_cell", 0.0):
            time.sleep(FLAGS.test_pause_after_cell)
        return record


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


def latest_complete(records: Iterable[Mapping]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """For each cell key: its last "cell" record, and the "batch" records of that same attempt (in
    batch order). Records of interrupted attempts (no "cell" record) and of superseded ones are left
    out, so a cell recomputed after a crash is counted once."""
    records = list(records)
    cells: dict[str, dict] = {}
    for r in records:
        if r.get("type") == "cell" and "key" in r:
            cells[key_id(r["key"])] = r
    batches: dict[str, list[dict]] = {k: [] for k in cells}
    seen: set = set()
    for r in records:
        if r.get("type") != "batch" or "key" not in r:
            continue
        k = key_id(r["key"])
        if k in cells and r.get("attempt") == cells[k].get("attempt") and (k, r.get("batch_index")) not in seen:
            seen.add((k, r.get("batch_index")))
            batches[k].append(r)
    for k in batches:
        batches[k].sort(key=lambda r: r.get("batch_index", 0))
    return cells, batches
