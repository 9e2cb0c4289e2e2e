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

The one exception is a run whose processes each run their own share of the cells
(--cell_parallelism=per_process; `share=` below): each of its processes is a writer. They hold
`<out>.lock` shared (so a one-writer program on the file is refused, and they are refused while one
runs), each holds `<out>.lock.process<i>` exclusively (process i started twice is refused), and every
append takes an exclusive flock on the results file itself, rereads it and skips a "cell" record
whose cell another writer has already recorded, so a cell is written once.

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


def read_jsonl(path: str | os.PathLike, repair: bool = False, warn: bool = True) -> list[dict]:
    """Complete records of a JSONL file.

    A last line without its trailing newline is a torn write: it is ignored (and, with repair=True,
    cut off the file so that later appends start on a fresh line). A complete line that is not a JSON
    object is reported with its line number and left out (and, with repair=True, moved to
    `<path>.rejected`, the file rewritten without it). Only a writer that no other writer runs beside
    (or that holds the file's append lock: see _locked_append) may repair it. warn=False reads quietly.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    torn = end < len(data)
    if torn and warn:
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
        if warn or repair:
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


def _lock_as_one_of_several(path: Path, process_id: int) -> None:
    """Joins the writers of a run whose processes each append their own cells (see the module
    docstring): <path>.lock shared, <path>.lock.process<i> exclusive; ResultsFileInUse when a
    one-writer program holds the file or process i of this run is already running."""
    lock_path = path.with_name(path.name + ".lock")
    member_path = path.with_name(f"{path.name}.lock.process{process_id}")
    if os.path.realpath(member_path) in _HELD_LOCKS:
        return
    fds = []
    try:
        for p, how, who in ((lock_path, fcntl.LOCK_SH, "a program that is its only writer"),
                            (member_path, fcntl.LOCK_EX, f"process {process_id} of another run of this sweep")):
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise ResultsFileInUse(
                    f"results file {path} is being written by {who} (pid {holder}; lock {p}). Wait for it to "
                    "finish or stop it, or give this run another --out.") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:  # who holds them, for the refusal messages (a hint: several writers share <path>.lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}, a writer of a per-process run\n".encode(), 0)
    _HELD_LOCKS[os.path.realpath(lock_path) + " shared"] = fds[0]
    _HELD_LOCKS[os.path.realpath(member_path)] = fds[1]


def _locked_append(path: Path, line: bytes | None, skip_if_finished: Mapping | None = None,
                   repair: bool = False) -> tuple[list[dict], bool]:
    """Under an exclusive flock on the results file itself (the writers of a per-process run take
    turns here): optionally repairs the file (read_jsonl(repair=True)), rereads every writer's records,
    and appends `line` unless skip_if_finished names a cell that already has a "cell" record.
    Returns (the records before the append, whether it appended).

    The lock belongs to the file's inode; a repair that moves malformed lines aside replaces the file
    (a new inode), so a writer that finds the path no longer on its locked inode opens it again. A
    writer killed mid-write leaves a line without its newline; the next append ends that fragment with
    a newline first (a malformed line, skipped by readers and moved aside by the next repair)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                continue  # replaced by a repair while this writer waited
            records = read_jsonl(path, repair=repair, warn=repair)
            if line is None:
                return records, False
            if skip_if_finished is not None and key_id(skip_if_finished) in _finished(records):
                return records, False
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
            return records, True
        finally:
            os.close(fd)


def _finished(records: Iterable[Mapping]) -> set[str]:
    return {key_id(r["key"]) for r in records if r.get("type") == "cell" and "key" in r}


def key_id(key: Mapping) -> str:
    """Canonical string of a cell key (for set membership)."""
    return json.dumps(key, sort_keys=True, default=str)


class ResultsLog:
    """Append-only JSONL results of one program, its only writer (see the module docstring).

    Raises ResultsFileInUse when another process holds the file. With write=False (the other
    processes of a jax.distributed run: see `open_log`) it reads the file and keeps appended records
    in memory only, so every process knows which cells are finished and each cell is written once.
    With share=(process_id, num_processes) it is one of the writers of a run whose processes each run
    their own cells: appends take turns on the file and a cell already recorded by another writer is
    not written again (append returns None then)."""

    def __init__(self, path: str | os.PathLike, write: bool = True, share: tuple[int, int] | None = None):
        self.path = Path(path)
        self.write = write
        self.share = share
        if share is not None:
            if not write:
                raise ValueError("a ResultsLog with share= is one of its run's writers: write must be True")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _lock_as_one_of_several(self.path, share[0])
            self.records = _locked_append(self.path, None, repair=True)[0]
            return
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _lock_for_writing(self.path)  # before the repair: it may rewrite the file
        self.records = read_jsonl(self.path, repair=write) if (write or self.path.exists()) else []

    def finished(self) -> set[str]:
        """key_id of every cell with a final ("type": "cell") record."""
        return _finished(self.records)

    def is_finished(self, key: Mapping) -> bool:
        return key_id(key) in self.finished()

    def append(self, record: Mapping) -> dict | None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
        if self.share is not None:
            is_cell = record.get("type") == "cell" and "key" in record
            self.records, written = _locked_append(self.path, line, record["key"] if is_cell else None)
            if not written:
                logging.warning("%s: cell %s was already recorded by another writer; not written again",
                                self.path, key_id(record["key"]))
                return None
        elif self.write:
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


def open_log(path: str | os.PathLike, share: tuple[int, int] | None = None) -> ResultsLog:
    """The program's results log: process 0 of a jax.distributed run (or the only process) writes
    it; the others read it once process 0 has locked and repaired it, and never write. With
    share=(process_id, num_processes) (each process runs its own cells) every process writes it."""
    from jaxedit import distributed

    if share is not None:
        return ResultsLog(path, share=share)
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
