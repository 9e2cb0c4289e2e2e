"""CounterFact loaders: the shared reduced files, the original-format fixture, malformed records, offline."""
import copy
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jaxedit.data import counterfact as cf
from jaxedit.requests import EditRequest

FIXTURE = Path(__file__).parent / "fixtures" / "counterfact_original_small.json"


@pytest.fixture(scope="module")
def edit_raw(data_dir):
    with open(data_dir / "counterfact" / "counterfact-edit.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def edit_requests(edit_raw):
    return cf.parse_records(edit_raw)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails loudly (tests must never reach the network)."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def easyedit_record(**changes):
    rec = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
           "target_new": "English", "ground_truth": "French",
           "rephrase_prompt": "Danielle Darrieux speaks the language", "locality_prompt": "Michel Rocard speaks",
           "locality_ground_truth": "French"}
    rec.update(changes)
    return rec


def original_record():
    with open(FIXTURE) as f:
        rec = json.load(f)[0]
    rec["case_id"] = 7
    return rec


# ------------------------------------------------------------------------------- shared reduced file
def test_shared_reduced_file_parses(edit_requests, edit_raw):
    assert len(edit_requests) == len(edit_raw) == 10000
    r0 = edit_requests[0]
    assert r0.case_id == 0
    assert r0.prompt == "The mother tongue of {} is"
    assert r0.subject == "Danielle Darrieux" and r0.target_new == "English" and r0.target_true == "French"
    assert r0.filled_prompt == edit_raw[0]["prompt"]
    assert r0.paraphrase_prompts == (edit_raw[0]["rephrase_prompt"],)
    assert r0.neighborhood_prompts == (edit_raw[0]["locality_prompt"],)
    assert all(r.prompt.count("{}") == 1 for r in edit_requests)
    assert [r.case_id for r in edit_requests[:5]] == [x["case_id"] for x in edit_raw[:5]]
    assert len({r.case_id for r in edit_requests}) == 10000


def test_locality_truth_equals_ground_truth_in_shared_files(edit_raw, data_dir):
    with open(data_dir / "counterfact" / "counterfact-train.json") as f:
        train = json.load(f)
    for rec in edit_raw + train:
        assert rec["locality_ground_truth"] == rec["ground_truth"], rec["case_id"]


def test_load_counterfact_by_name_and_selection(edit_requests):
    assert cf.shared_path("edit").is_file()
    ids = [edit_requests[5].case_id, edit_requests[0].case_id, edit_requests[42].case_id]
    chosen = cf.load_counterfact("edit", ids=ids)
    assert [r.case_id for r in chosen] == ids
    assert chosen[1] == edit_requests[0]

    a = cf.select(edit_requests, n=20, seed=3)
    b = cf.select(edit_requests, n=20, seed=3)
    c = cf.select(edit_requests, n=20, seed=4)
    assert a == b and len(a) == 20 and len({r.case_id for r in a}) == 20
    assert [r.case_id for r in a] != [r.case_id for r in c]
    positions = [edit_requests.index(r) for r in a]
    assert positions == sorted(positions)  # dataset order
    assert cf.select(edit_requests) == edit_requests


def test_selection_errors(edit_requests):
    with pytest.raises(ValueError, match=r"2 requested case ids not found: 123456789, -5"):
        cf.select(edit_requests, ids=[0, 123456789, -5])
    with pytest.raises(ValueError, match="n=10001"):
        cf.select(edit_requests, n=10001)
    with pytest.raises(ValueError, match="not both"):
        cf.select(edit_requests, ids=[0], n=1)


def test_generation_prompts(data_dir, tmp_path):
    prompts = cf.load_generation_prompts(data_dir / "counterfact" / "generation_prompts.json")
    assert len(prompts) == 62346 and all(isinstance(p, str) and p for p in prompts)
    assert cf.load_generation_prompts() == prompts
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["fine", 3]))
    with pytest.raises(ValueError, match="entry 1"):
        cf.load_generation_prompts(bad)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXEDIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="set JAXEDIT_DATA"):  # never guessed from the source tree
        cf.data_dir()
    assert cf.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("JAXEDIT_DATA", str(tmp_path))
    assert cf.data_dir() == tmp_path
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-train.json").write_text(json.dumps([easyedit_record()]))
    (r,) = cf.load_counterfact("train")
    assert r.case_id == 7 and r.prompt == "The mother tongue of {} is"
    with pytest.raises(FileNotFoundError, match="JAXEDIT_DATA"):
        cf.load_counterfact("edit")


# ------------------------------------------------------------------------------ original format
def test_original_fixture():
    reqs = cf.load_counterfact(FIXTURE)
    assert [r.case_id for r in reqs] == [0, 1, 2, 3]
    r = reqs[0]
    assert isinstance(r, EditRequest)
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 3
    assert len(r.generation_prompts) == 2 and len(r.attribute_prompts) == 2
    assert reqs[2].attribute_prompts == ()
    assert cf.load_counterfact(FIXTURE, ids=[3, 1])[0].subject == "Autonomous University of Madrid"
    with open(FIXTURE) as f:
        assert cf.detect_format(json.load(f)[0]) == cf.ORIGINAL
    assert cf.detect_format(easyedit_record()) == cf.EASYEDIT


def test_jsonl_file(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(easyedit_record(case_id=i)) for i in range(3)) + "\n")
    assert [r.case_id for r in cf.load_counterfact(path)] == [0, 1, 2]


# ------------------------------------------------------------------------------ malformed records
@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("ground_truth"), "missing field 'ground_truth'"),
    (lambda r: r.pop("rephrase_prompt"), "missing field 'rephrase_prompt'"),
    (lambda r: r.update(subject="Edith Piaf"), "subject 'Edith Piaf' is not in the prompt"),
    (lambda r: r.update(target_new="  "), "field 'target_new' is empty"),
    (lambda r: r.update(ground_truth=""), "field 'ground_truth' is empty"),
    (lambda r: r.update(locality_ground_truth="German"), "locality_ground_truth 'German' differs"),
    (lambda r: r.update(locality_prompt=[]), None),  # an empty list is allowed (no neighbourhood prompt)
])
def test_malformed_easyedit(change, message):
    rec = easyedit_record()
    change(rec)
    if message is None:
        assert cf.parse_records([rec])[0].neighborhood_prompts == ()
        return
    with pytest.raises(ValueError, match=r"case 7\b.*" + message):
        cf.parse_records([rec])


def _drop_true(r):
    del r["requested_rewrite"]["target_true"]


def _template_without_braces(r):
    r["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"


@pytest.mark.parametrize("change, message", [
    (_drop_true, "missing field 'requested_rewrite.target_true'"),
    (lambda r: r.pop("neighborhood_prompts"), "missing field 'neighborhood_prompts'"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=""), "requested_rewrite.target_new.str' is empty"),
    (_template_without_braces, "must contain exactly one '{}', found 0"),
    (lambda r: r.update(paraphrase_prompts=["ok", 5]), r"'paraphrase_prompts'\[1\] must be a string"),
    (lambda r: r["requested_rewrite"].update(subject=""), "requested_rewrite.subject' is empty"),
])
def test_malformed_original(change, message):
    rec = original_record()
    change(rec)
    with pytest.raises(ValueError, match=r"case 7\b.*" + message):
        cf.parse_records([rec])


def test_mixed_formats_and_duplicates():
    with pytest.raises(ValueError, match="case 7: record is not in the easyedit format"):
        cf.parse_records([easyedit_record(case_id=1), original_record()])
    with pytest.raises(ValueError, match=r"duplicate case ids \[1\]"):
        cf.parse_records([easyedit_record(case_id=1), easyedit_record(case_id=1)])
    with pytest.raises(ValueError, match="unknown record format"):
        cf.parse_records([{"case_id": 3, "foo": 1}])
    with pytest.raises(ValueError, match="no CounterFact records"):
        cf.parse_records([])


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        cf.load_counterfact(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------- downloads, offline
def test_url_download_offline_fails_clearly(monkeypatch, tmp_path, no_network):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(cf.DownloadError, match=r"rome\.baulab\.info.*local path"):
        cf.load_counterfact("original", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_url_download_uses_cache(monkeypatch, tmp_path, no_network):
    calls = []

    class Response:
        def __init__(self, payload):
            self.payload = payload

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return self.payload

    def fake_urlopen(url, timeout):
        calls.append(url)
        return Response(FIXTURE.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    first = cf.load_counterfact(cf.ORIGINAL_URL, cache_dir=tmp_path, n=2, seed=0)
    again = cf.load_counterfact("original", cache_dir=tmp_path, n=2, seed=0)
    assert calls == [cf.ORIGINAL_URL] and first == again and len(first) == 2
    assert (tmp_path / "counterfact.json").is_file()


def test_hub_offline_fails_clearly(monkeypatch, tmp_path, no_network):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(cf.DownloadError, match=r"azhx/counterfact.*local counterfact\.json"):
        cf.load_counterfact("hf:azhx/counterfact", cache_dir=tmp_path)


def test_hub_records_are_parsed(monkeypatch, no_network):
    import datasets

    with open(FIXTURE) as f:
        rows = json.load(f)
    seen = {}

    def fake_load_dataset(hub_id, split, cache_dir):
        seen.update(hub_id=hub_id, split=split)
        return [copy.deepcopy(r) for r in rows]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    reqs = cf.load_counterfact("hf:azhx/counterfact", ids=[2])
    assert seen == {"hub_id": "azhx/counterfact", "split": "train"}
    assert reqs[0].subject == "Toko Yasuda" and reqs[0].target_new == "piano"


def test_garbage_lines_name_file_and_line(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(easyedit_record()) + "\n\n{this is not json\n")
    with pytest.raises(ValueError, match=r"cf\.jsonl, line 3: not a JSON record"):
        cf.read_json_records(path)
    broken = tmp_path / "cf.json"
    broken.write_text('[\n  {"case_id": 1,\n  oops\n]')
    with pytest.raises(ValueError, match=r"cf\.json, line 3, column 3: invalid JSON"):
        cf.read_json_records(broken)
