"""Facts files as researchers save them (a byte-order mark, another encoding, a folder, semicolons) and
facts that cannot all hold, each read or refused with the file and line named."""
import json

import pytest

from jaxedit.data import facts as facts_file
from jaxedit.data.facts import FactsFileError

HEADER = "prompt,subject,target_new,target_true\n"
ROW = '"The mother tongue of {} is",Danielle Darrieux,English,French\n'


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path, suffix):
    record = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
    text = {".csv": HEADER + ROW, ".jsonl": json.dumps(record) + "\n", ".json": json.dumps([record])}[suffix]
    path = tmp_path / f"facts{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (fact,) = facts_file.read_facts(path)
    assert fact.prompt == "The mother tongue of {} is" and fact.target_new == "English"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}


@pytest.mark.parametrize("case, name, text, match", [
    ("two targets for one fact", "f.jsonl", _jsonl(FACT, {**FACT, "subject": "Lyon"}, {**FACT, "target_new": "German"}),
     r"f\.jsonl, line 3: the prompt 'The mother tongue of \{\} is' with subject 'Danielle Darrieux' asks for "
     r"'German', but line 1 asks for 'English'"),
    ("one case_id twice", "f.jsonl", _jsonl({**FACT, "case_id": "a"}, {**FACT, "subject": "Lyon", "case_id": "a"}),
     r"line 2: case_id 'a' is also the case_id of line 1"),
    ("an empty file", "f.json", "  \n", r"f\.json: the file is empty"),
    ("semicolons", "f.csv", "prompt;subject;target_new\n{} is;x;y\n", r"line 1: .* separated by ';'"),
    ("spaces in the header", "f.csv", "prompt, subject, target_new\n{} is,x,y\n", "remove the spaces after the commas"),
    ("another header", "f.csv", "question,answer\n{} is,x\n", r"no column\(s\) \['prompt', 'subject', 'target_new'\]; "
                                                              r"the header is \['question', 'answer'\]"),
])
def test_bad_facts_files_are_named(tmp_path, case, name, text, match):
    with pytest.raises(FactsFileError, match=match):
        facts_file.read_facts(_write(tmp_path, name, text))


def test_the_same_fact_twice_with_one_target_is_read(tmp_path):
    got = facts_file.read_facts(_write(tmp_path, "f.jsonl", _jsonl(FACT, {**FACT, "target_new": " English"})))
    assert len(got) == 2


def test_a_folder_and_a_file_in_another_encoding_are_named(tmp_path):
    with pytest.raises(FactsFileError, match="is a folder; a facts file is one .jsonl, .json or .csv file"):
        facts_file.read_facts(tmp_path)
    latin = tmp_path / "f.csv"
    latin.write_bytes((HEADER + '"La langue de {} est",Fran\xe7ois,anglais,\n').encode("latin-1"))
    with pytest.raises(FactsFileError, match=r"f\.csv: not UTF-8 text .* save it as UTF-8"):
        facts_file.read_facts(latin)
