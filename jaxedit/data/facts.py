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
      FactsFileError: an empty file, a line that is not JSON, a missing or empty field, a subject
        that is not in its prompt, ... (naming file, line and field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no facts file at {path}")
    suffix = path.suffix.lower()
    facts: list[EditRequest] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FactsFileError(f"{path}, line {number}: not a JSON object ({e.msg})") from None
                facts.append(_fact(record, f"{path}, line {number}", number))
    elif suffix == ".json":
        data = read_json_list(path, FactsFileError)
        facts = [_fact(record, f"{path}, record {i}", i) for i, record in enumerate(data)]
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if reader.fieldnames and missing:
                raise FactsFileError(f"{path}, line 1: the header has no column(s) {missing}")
            for record in reader:
                if None in record:
                    raise FactsFileError(f"{path}, line {reader.line_num}: more cells than header columns")
                facts.append(_fact(record, f"{path}, line {reader.line_num}", reader.line_num))
    else:
        raise FactsFileError(f"{path}: facts files are .jsonl, .json or .csv")
    if not facts:
        raise FactsFileError(f"{path}: the file holds no facts")
    return tuple(facts)
