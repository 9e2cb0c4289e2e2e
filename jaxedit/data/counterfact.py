"""CounterFact loaders: the original JSON, the reduced EasyEdit/MEND format, hub and URL downloads.

Every loader returns one structure, a tuple of `jaxedit.requests.EditRequest`, whatever the source:

* the original CounterFact (Meng et al. 2022, 21,919 records)::

    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": ...,
     "target_new": {"str": "English", "id": ...}, "target_true": {"str": "French", "id": ...},
     "relation_id": "P103"}, "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "attribute_prompts": [...], "generation_prompts": [...]}

  read from a local file, downloaded from its public URL (`ORIGINAL_URL`), or from the hub through
  `datasets` (`HUB_ID`);
* the reduced format of EasyEdit and MEND (the shared `counterfact-{train,edit}.json`)::

    {"case_id", "prompt" (subject filled in), "subject", "target_new", "ground_truth",
     "rephrase_prompt", "locality_prompt", "locality_ground_truth"}

  where the template is the prompt with the subject replaced by "{}", the rephrase prompt is the one
  paraphrase and the locality prompt the one neighbourhood prompt. Its locality_ground_truth always
  equals ground_truth (neighbourhood subjects share the true object), so neighbourhood scores compare
  target_true with target_new exactly as the original does; a record where they differ is rejected.

Malformed records raise ValueError naming the case id and what is wrong. Nothing is read or
downloaded at import time.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jaxedit.data.paths import DATA_ENV, cache_dir as default_cache_dir, data_dir
from jaxedit.requests import EditRequest

ORIGINAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
HUB_ID = "azhx/counterfact"

ORIGINAL = "original"
EASYEDIT = "easyedit"
_SHARED_SPLITS = ("train", "edit")

_ORIGINAL_REWRITE_FIELDS = ("prompt", "subject", "target_new", "target_true")
_EASYEDIT_FIELDS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                    "locality_prompt")


class DownloadError(RuntimeError):
    """CounterFact could not be fetched (no network, hub unreachable...): use a local file instead."""


# ---------------------------------------------------------------------------------------- paths
def shared_path(split: str, data: str | os.PathLike | None = None) -> Path:
    """Path of the reduced CounterFact file for split "train" or "edit" in the data folder (see
    jaxedit.data.paths.data_dir)."""
    if split not in _SHARED_SPLITS:
        raise ValueError(f"unknown CounterFact split {split!r}; expected one of {_SHARED_SPLITS}")
    return data_dir(data) / "counterfact" / f"counterfact-{split}.json"


# -------------------------------------------------------------------------------------- parsing
def _case(record: Any, index: int) -> Any:
    if isinstance(record, Mapping) and record.get("case_id") is not None:
        return record["case_id"]
    return f"#{index} (no case_id)"


def _fail(case_id: Any, why: str):
    raise ValueError(f"CounterFact case {case_id}: {why}")


def _str_field(record: Mapping, key: str, case_id: Any, where: str = "") -> str:
    if key not in record:
        _fail(case_id, f"missing field '{where}{key}'")
    value = record[key]
    if not isinstance(value, str):
        _fail(case_id, f"field '{where}{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        _fail(case_id, f"field '{where}{key}' is empty")
    return value


def _prompt_list(record: Mapping, key: str, case_id: Any, required: bool) -> tuple[str, ...]:
    """A field holding a list of prompts (a single string is accepted as a list of one)."""
    if key not in record or record[key] is None:
        if required:
            _fail(case_id, f"missing field {key!r}")
        return ()
    value = record[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        _fail(case_id, f"field {key!r} must be a list of strings, got {type(value).__name__}")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            _fail(case_id, f"field {key!r}[{i}] must be a string, got {type(p).__name__}")
        if not p.strip():
            _fail(case_id, f"field {key!r}[{i}] is empty")
    return tuple(value)


def _target_str(rewrite: Mapping, key: str, case_id: Any) -> str:
    if key not in rewrite:
        _fail(case_id, f"missing field 'requested_rewrite.{key}'")
    target = rewrite[key]
    if isinstance(target, Mapping):
        return _str_field(target, "str", case_id, where=f"requested_rewrite.{key}.")
    if isinstance(target, str):  # tolerated: a plain string instead of {"str", "id"}
        if not target.strip():
            _fail(case_id, f"field 'requested_rewrite.{key}' is empty")
        return target
    _fail(case_id, f"field 'requested_rewrite.{key}' must be {{'str', 'id'}}, got {type(target).__name__}")


def request_from_original(record: Mapping, index: int = 0) -> EditRequest:
    """One record of the original CounterFact JSON -> EditRequest (index only for error messages)."""
    case_id = _case(record, index)
    if not isinstance(record, Mapping):
        _fail(case_id, f"record must be a JSON object, got {type(record).__name__}")
    if "case_id" not in record:
        _fail(case_id, "missing field 'case_id'")
    if "requested_rewrite" not in record:
        _fail(case_id, "missing field 'requested_rewrite'")
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        _fail(case_id, f"field 'requested_rewrite' must be an object, got {type(rewrite).__name__}")
    prompt = _str_field(rewrite, "prompt", case_id, where="requested_rewrite.")
    subject = _str_field(rewrite, "subject", case_id, where="requested_rewrite.")
    n = prompt.count("{}")
    if n != 1:
        _fail(case_id, f"template 'requested_rewrite.prompt' must contain exactly one '{{}}', found {n}: "
                       f"{prompt!r}")
    target_new = _target_str(rewrite, "target_new", case_id)
    target_true = _target_str(rewrite, "target_true", case_id)
    return EditRequest(
        prompt=prompt, subject=subject, target_new=target_new, target_true=target_true, case_id=case_id,
        paraphrase_prompts=_prompt_list(record, "paraphrase_prompts", case_id, required=True),
        neighborhood_prompts=_prompt_list(record, "neighborhood_prompts", case_id, required=True),
        attribute_prompts=_prompt_list(record, "attribute_prompts", case_id, required=False),
        generation_prompts=_prompt_list(record, "generation_prompts", case_id, required=False),
    )


def request_from_easyedit(record: Mapping, index: int = 0) -> EditRequest:
    """One record of the reduced EasyEdit/MEND format -> EditRequest (index only for error messages)."""
    case_id = _case(record, index)
    if not isinstance(record, Mapping):
        _fail(case_id, f"record must be a JSON object, got {type(record).__name__}")
    for key in _EASYEDIT_FIELDS:
        if key not in record:
            _fail(case_id, f"missing field {key!r}")
    prompt = _str_field(record, "prompt", case_id)
    subject = _str_field(record, "subject", case_id)
    target_new = _str_field(record, "target_new", case_id)
    target_true = _str_field(record, "ground_truth", case_id)
    if subject not in prompt:
        _fail(case_id, f"subject {subject!r} is not in the prompt {prompt!r}")
    if "{}" in prompt:
        _fail(case_id, f"prompt {prompt!r} already contains '{{}}' (expected the subject filled in)")
    locality_truth = record.get("locality_ground_truth")
    if locality_truth is not None and str(locality_truth).strip() != target_true.strip():
        _fail(case_id, f"locality_ground_truth {locality_truth!r} differs from ground_truth {target_true!r}; "
                       "neighbourhood scores compare target_true with target_new, as the original does")
    return EditRequest.from_filled(
        prompt, subject, target_new, target_true=target_true, case_id=case_id,
        paraphrase_prompts=_prompt_list(record, "rephrase_prompt", case_id, required=True),
        neighborhood_prompts=_prompt_list(record, "locality_prompt", case_id, required=True),
    )


def detect_format(record: Mapping) -> str:
    """ORIGINAL if the record has 'requested_rewrite', EASYEDIT if it has 'prompt' and 'ground_truth',
    'rephrase_prompt' or 'locality_prompt' (so a record missing one of them is still reported by field)."""
    if isinstance(record, Mapping):
        if "requested_rewrite" in record:
            return ORIGINAL
        if "prompt" in record and any(k in record for k in ("ground_truth", "rephrase_prompt", "locality_prompt")):
            return EASYEDIT
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"CounterFact case {_case(record, 0)}: unknown record format (keys {keys}); expected "
                     "the original ('requested_rewrite', ...) or the EasyEdit one ('prompt', 'ground_truth', ...)")


def parse_records(records: Iterable[Mapping], fmt: str | None = None) -> tuple[EditRequest, ...]:
    """Records of one format (detected from the first when fmt is None) -> tuple of EditRequest.

    Raises ValueError on an empty list, a record of another format, or duplicate case ids.
    """
    records = list(records)
    if not records:
        raise ValueError("no CounterFact records")
    fmt = detect_format(records[0]) if fmt is None else fmt
    parse = {ORIGINAL: request_from_original, EASYEDIT: request_from_easyedit}.get(fmt)
    if parse is None:
        raise ValueError(f"unknown CounterFact format {fmt!r}; expected {ORIGINAL!r} or {EASYEDIT!r}")
    out = []
    for i, r in enumerate(records):
        if detect_format(r) != fmt:
            _fail(_case(r, i), f"record is not in the {fmt} format of the first record")
        out.append(parse(r, i))
    seen, dup = set(), []
    for r in out:
        if r.case_id in seen:
            dup.append(r.case_id)
        seen.add(r.case_id)
    if dup:
        raise ValueError(f"CounterFact: duplicate case ids {sorted(set(dup))[:10]}")
    return tuple(out)


# ---------------------------------------------------------------------------------------- sources
def read_json_records(path: str | os.PathLike) -> list:
    """The JSON list in a local file (a .jsonl file: one record a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CounterFact file not found: {path} (set ${DATA_ENV} for the shared data)")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            data = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        data.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}): "
                                         f"{line.strip()[:80]!r}") from None
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of CounterFact records, got {type(data).__name__}")
    return data


def download_original(url: str = ORIGINAL_URL, cache_dir: str | os.PathLike | None = None,
                      timeout: float = 60.0) -> Path:
    """Downloads the original counterfact.json once into cache_dir and returns its path.

    Raises DownloadError (naming the url and what to do instead) when the download fails.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / Path(urllib.request.urlparse(url).path).name
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"could not download CounterFact from {url} ({e}); without internet, download "
                            "counterfact.json elsewhere and pass its local path") from e
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(payload)
    tmp.replace(target)
    return target


def load_hub_records(hub_id: str = HUB_ID, split: str = "train",
                     cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of a hub copy of CounterFact through `datasets.load_dataset`.

    Raises DownloadError when the hub cannot be reached (offline, HF_DATASETS_OFFLINE=1, no cache).
    """
    import datasets  # heavy: imported only when used

    try:
        ds = datasets.load_dataset(hub_id, split=split,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except (ConnectionError, OSError, FileNotFoundError) as e:
        raise DownloadError(f"could not load CounterFact {hub_id!r} from the hub ({type(e).__name__}: {e}); "
                            "without internet, pass a local counterfact.json path") from e
    return [dict(r) for r in ds]


def load_requests(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> tuple[EditRequest, ...]:
    """All cases of a source, format auto-detected.

    source:
      * a local .json / .jsonl file (either format);
      * "train" or "edit": the shared reduced files under data_dir()/counterfact;
      * "original": the original counterfact.json from ORIGINAL_URL (downloaded once, cached);
      * an http(s) URL: downloaded once, cached;
      * "hf:<owner/name>" (e.g. "hf:azhx/counterfact", split "train"): the hub through `datasets`.
    """
    s = os.fspath(source)
    if s in _SHARED_SPLITS and not Path(s).exists():
        records = read_json_records(shared_path(s))
    elif s == ORIGINAL and not Path(s).exists():
        records = read_json_records(download_original(ORIGINAL_URL, cache_dir))
    elif s.startswith(("http://", "https://")):
        records = read_json_records(download_original(s, cache_dir))
    elif s.startswith("hf:"):
        hub_id, _, split = s[3:].partition("@")
        records = load_hub_records(hub_id or HUB_ID, split or "train", cache_dir)
    else:
        records = read_json_records(s)
    return parse_records(records)


# -------------------------------------------------------------------------------------- selection
def select(requests: Sequence[EditRequest], ids: Sequence | None = None, n: int | None = None,
           seed: int = 0) -> tuple[EditRequest, ...]:
    """Cases by explicit ids (in the order given), or a seeded random sample of n (in dataset order).

    Raises ValueError naming the ids that are missing, or when n exceeds the number of cases.
    """
    requests = tuple(requests)
    if ids is not None and n is not None:
        raise ValueError("select cases by ids or by n, not both")
    if ids is not None:
        by_id = {r.case_id: r for r in requests}
        missing = [i for i in ids if i not in by_id]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise ValueError(f"CounterFact: {len(missing)} requested case ids not found: {shown}")
        return tuple(by_id[i] for i in ids)
    if n is not None:
        if not 0 <= n <= len(requests):
            raise ValueError(f"cannot sample n={n} cases out of {len(requests)}")
        chosen = np.random.default_rng(seed).choice(len(requests), size=n, replace=False)
        return tuple(requests[i] for i in sorted(chosen.tolist()))
    return requests


def load_counterfact(source: str | os.PathLike = "edit", ids: Sequence | None = None, n: int | None = None,
                     seed: int = 0, cache_dir: str | os.PathLike | None = None) -> tuple[EditRequest, ...]:
    """Loads CounterFact from `source` (see load_requests) and selects cases (see select).

    Returns:
      tuple of EditRequest with target_true, paraphrase and neighbourhood prompts filled in.
    """
    return select(load_requests(source, cache_dir), ids=ids, n=n, seed=seed)


def load_generation_prompts(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The flat list of generation prompts (default: data_dir()/counterfact/generation_prompts.json)."""
    path = Path(path) if path is not None else data_dir() / "counterfact" / "generation_prompts.json"
    if not path.is_file():
        raise FileNotFoundError(f"generation prompts file not found: {path} (set ${DATA_ENV})")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of strings, got {type(data).__name__}")
    for i, p in enumerate(data):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{path}: entry {i} is not a non-empty string: {p!r}")
    return tuple(data)
