"""The resumable JSONL results log of the experiment programs.

Every program appends one JSON record per finished unit of work to its --out file, written with a
single write() on an O_APPEND descriptor, flushed and fsynced at once. On (re)start the file is read
back: a last line without its newline (a crash mid-write) is dropped and the file is cut back to the
last complete line before anything new is appended, so a record is never half-kept and never
duplicated. Each record carries `key` (what cell it belongs to, including the settings that define
the run: model, case count, seed...) and `attempt` (a random id per program run and cell), so readers
can tell a finished cell (a record with "type": "cell") from the left-overs of an interrupted one
(per-batch records of an attempt that never wrote its "cell" record).

One writer per file: a program's ResultsLog holds an exclusive flock on the sibling `<out>.lock`
(which names the holder's pid) for the rest of the process, and a second program started on the same
file stops at once with ResultsFileInUse. It is refused rather than made to wait, since a second run
on one file is almost always the same command started twice or two sweeps given one --out by mistake;
waiting would hide that and, for two different sweeps, serialise hours of work without a word. The
kernel releases the lock when the process ends, however it ends.

A complete line that is not a JSON object is reported (file and line number) and, on a program's
start, moved aside: appended to `<out>.rejected`, and the file rewritten without it (temp file, fsync,
os.replace), so that later reads see only records.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from experiments.program import FLAGS


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Complete records of a JSONL file.

    A last line without its trailing newline is a torn write: it is ignored (and, with repair=True,
    cut off the file so that later appends start on a fresh line). A complete line that is not a JSON
    object is reported with its line number and left out (and, with repair=True, moved to
    `<path>.rejected`, the file rewritten without it). Only the file's one writer may repair it.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    torn = end < len(data)
    if torn:
        logging.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - end)
    records, kept, rejected = [], [], []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        why = None
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            why = "not JSON"
        else:
            if not isinstance(rec, dict):
                why = f"a JSON {type(rec).__name__}, not an object"
        if why is None:
            records.append(rec)
            kept.append(line)
            continue
        rejected.append(line)
        logging.warning("%s:%d: malformed line (%s)%s: %.200r", path, n, why,
                        f", moved to {_rejected_path(path)}" if repair else ", skipped", line)
    if repair and rejected:
        _move_aside(path, kept, rejected)
    elif repair and torn:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records


def _rejected_path(path: Path) -> Path:
    return path.with_name(path.name + ".rejected")


def _move_aside(path: Path, kept: list[bytes], rejected: list[bytes]) -> None:
    """Appends the rejected lines to <path>.rejected, then atomically rewrites path with the kept ones.

    In that order, so a crash in between leaves a line in both files rather than in neither."""
    fd = os.open(_rejected_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"".join(line + b"\n" for line in rejected))
        os.fsync(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsFileInUse(RuntimeError):
    """Another process is writing the results file."""


_HELD_LOCKS: dict[str, int] = {}  # lock file (real path) -> its descriptor, held until the process ends


def _lock_for_writing(path: Path) -> None:
    """Takes the exclusive lock on <path>.lock for this process, or raises ResultsFileInUse.

    flock locks belong to the open file, and the kernel drops them when the process ends (also on a
    crash or kill); the descriptor is not inherited by child programs. A process that already holds
    the lock (two ResultsLogs on one file) keeps it."""
    lock_path = path.with_name(path.name + ".lock")
    key = os.path.realpath(lock_path)
    if key in _HELD_LOCKS:
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ResultsFileInUse(
            f"results file {path} is being written by another process (pid {holder}; lock {lock_path}). "
            "Wait for it to finish or stop it, or give this run another --out.") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd


def key_id(key: Mapping) -> str:
    """Canonical string of a cell key (for set membership)."""
    return json.dumps(key, sort_keys=True, default=str)


class ResultsLog:
    """Append-only JSONL results of one program, its only writer (see the module docstring).

    Raises ResultsFileInUse when another process holds the file. With write=False (the other
    processes of a jax.distributed run: see `open_log`) it reads the file and keeps appended records
    in memory only, so every process knows which cells are finished and each cell is written once."""

    def __init__(self, path: str | os.PathLike, write: bool = True):
        self.path = Path(path)
        self.write = write
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _lock_for_writing(self.path)  # before the repair: it may rewrite the file
        self.records = read_jsonl(self.path, repair=write) if (write or self.path.exists()) else []

    def finished(self) -> set[str]:
        """key_id of every cell with a final ("type": "cell") record."""
        return {key_id(r["key"]) for r in self.records if r.get("type") == "cell" and "key" in r}

    def is_finished(self, key: Mapping) -> bool:
        return key_id(key) in self.finished()

    def append(self, record: Mapping) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
        if self.write:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.records.append(json.loads(line))
        if record.get("type") == "cell" and _test_pause():
            time.sleep(_test_pause())
        return record


def open_log(path: str | os.PathLike) -> ResultsLog:
    """The program's results log: process 0 of a jax.distributed run (or the only process) writes
    it; the others read it once process 0 has locked and repaired it, and never write."""
    from jaxedit import distributed

    log = ResultsLog(path) if distributed.is_writer() else None
    distributed.agree(f"results file {path} open")
    return log if log is not None else ResultsLog(path, write=False)


def _test_pause() -> float:
    """--test_pause_after_cell of a parsed program; 0 when the flag is not defined or not parsed (the
    log used as a library, or in a test process that merely imported a program module)."""
    if "test_pause_after_cell" not in FLAGS or not FLAGS.is_parsed():
        return 0.0
    return FLAGS.test_pause_after_cell


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
