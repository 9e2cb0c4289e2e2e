"""A user's own facts to edit, from a JSONL, JSON or CSV file.

Each fact has `prompt`, `subject` and `target_new`, and optionally `target_true` and `case_id`. The
prompt holds the subject either as "{}" ("The mother tongue of {} is") or written inline ("The mother
tongue of Danielle Darrieux is"). Targets are plain strings (a leading space is added when they are
tokenised). Example JSONL line:

    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}

Every error names the file, the line (JSONL, CSV; the record index for JSON) and the field.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

from jaxedit.requests import EditRequest

REQUIRED = ("prompt", "subject", "target_new")
OPTIONAL = ("target_true", "case_id")


class FactsFileError(ValueError):
    """A facts file that cannot be read as facts; the message names file, line and field."""


def read_json_list(path: Path, error: type[Exception]) -> list:
    """The JSON list in `path`, or `error` naming the file (and the line of a syntax error)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of facts, got {type(data).__name__}")
    return data


def _fact(record: Any, where: str, default_id: int) -> EditRequest:
    if not isinstance(record, Mapping):
        raise FactsFileError(f"{where}: expected an object with fields {', '.join(REQUIRED)}, got "
                             f"{type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise FactsFileError(f"{where}: unknown field(s) {unknown}; a fact has {', '.join(REQUIRED + OPTIONAL)}")
    for name in REQUIRED:
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise FactsFileError(f"{where}: field {name!r} is missing or empty")
        if not isinstance(value, str):
            raise FactsFileError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    target_true = record.get("target_true")
    if isinstance(target_true, str) and not target_true.strip():
        target_true = None  # an empty CSV cell
    case_id = record.get("case_id")
    case_id = default_id if case_id in (None, "") else case_id
    prompt, subject = record["prompt"], record["subject"]
    try:
        if "{}" in prompt:
            return EditRequest(prompt=prompt, subject=subject, target_new=record["target_new"],
                               target_true=target_true, case_id=case_id)
        if subject not in prompt:
            raise FactsFileError(f"{where}: field 'prompt' {prompt!r} holds neither '{{}}' nor the subject "
                                 f"{subject!r}")
        return EditRequest.from_filled(prompt, subject, record["target_new"], target_true=target_true,
                                       case_id=case_id)
    except FactsFileError:
        raise
    except (TypeError, ValueError) as e:
        raise FactsFileError(f"{where}: {e}") from None


def read_facts(path: str | os.PathLike) -> tuple[EditRequest, ...]:
    """The facts of a .jsonl, .json (a list of objects) or .csv (a header row) file, in order.

    Raises:
      FileNotFoundError: no such file.
      FactsFileError: a folder, an empty or non-UTF-8 file, a line that is not JSON, a missing or
        empty field, a subject that is not in its prompt, two targets for one prompt and subject, a
        case_id used twice, ... (naming file, line and field). A UTF-8 byte-order mark is skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise FactsFileError(f"{path} is a folder; a facts file is one .jsonl, .json or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"no facts file at {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise FactsFileError(f"{path}: facts files are .jsonl, .json or .csv")
    try:  # utf-8-sig: files saved by Excel or Notepad begin with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FactsFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise FactsFileError(f"{path}: the file is empty; it holds no facts")
    facts: list[EditRequest] = []
    wheres: list[str] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FactsFileError(f"{path}, line {number}: not a JSON object ({e.msg})") from None
            wheres.append(f"line {number}")
            facts.append(_fact(record, f"{path}, line {number}", number))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FactsFileError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise FactsFileError(f"{path}: expected a JSON list of facts, got {type(data).__name__}")
        wheres = [f"record {i}" for i in range(len(data))]
        facts = [_fact(record, f"{path}, record {i}", i) for i, record in enumerate(data)]
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
        if reader.fieldnames and missing:
            raise FactsFileError(f"{path}, line 1: the header has no column(s) {missing}{_header_hint(reader.fieldnames)}")
        for record in reader:
            if None in record:
                raise FactsFileError(f"{path}, line {reader.line_num}: more cells than header columns")
            wheres.append(f"line {reader.line_num}")
            facts.append(_fact(record, f"{path}, line {reader.line_num}", reader.line_num))
    if not facts:
        raise FactsFileError(f"{path}: the file holds no facts")
    _check_one_target_per_fact(path, facts, wheres)
    return tuple(facts)


def _header_hint(fieldnames) -> str:
    """What is probably wrong with a CSV header that lacks a required column."""
    names = list(fieldnames)
    if len(names) == 1 and (";" in names[0] or "\t" in names[0]):
        return " (its cells are separated by ';' or tabs; facts CSV files are comma-separated)"
    if any(n != n.strip() for n in names) and all(c in [n.strip() for n in names] for c in REQUIRED):
        return " (the header's names have spaces around them: remove the spaces after the commas)"
    return f"; the header is {names}"


def _check_one_target_per_fact(path: Path, facts: list[EditRequest], wheres: list[str]) -> None:
    """FactsFileError when two facts share a case_id, or one prompt and subject ask for two targets:
    both edits cannot hold (one key, two values), and the later batch would overwrite the earlier."""
    by_fact: dict[tuple[str, str], int] = {}
    by_id: dict[Any, int] = {}
    for i, f in enumerate(facts):
        j = by_fact.setdefault((f.prompt, f.subject), i)
        if facts[j].target_new.strip() != f.target_new.strip():
            raise FactsFileError(
                f"{path}, {wheres[i]}: the prompt {f.prompt!r} with subject {f.subject!r} asks for "
                f"{f.target_new!r}, but {wheres[j]} asks for {facts[j].target_new!r}; a run edits a fact once, "
                "so keep one of them (or edit the other in a second run)")
        j = by_id.setdefault(f.case_id, i)
        if j != i:
            raise FactsFileError(f"{path}, {wheres[i]}: case_id {f.case_id!r} is also the case_id of {wheres[j]}; "
                                 "give every fact its own case_id (or none: the line number is used)")
