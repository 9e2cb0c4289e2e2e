"""General-ability test sets: prompts, label words and answers read from $JAXEDIT_DATA/general."""
import json

import pytest

from jaxedit.data import general


def test_every_task_loads_100_questions_after_the_few_shot_pool():
    tasks = general.load_general_tasks()
    assert set(tasks) == set(general.TASKS) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu"}
    for task, questions in tasks.items():
        assert len(questions) == 100, task
        answers = [q.answer for q in questions]
        # records 10..109 are class-balanced in every file (data/general/README.md)
        assert max(answers.count(a) for a in set(answers)) == 100 // len(questions[0].choices), task
    assert tasks["mmlu"][0].choices == ("A", "B", "C", "D") and tasks["mmlu"][0].chance == 0.25


def test_rte_label_0_is_entailment_so_true(data_dir):
    records = [json.loads(line) for line in (data_dir / "general" / "rte.jsonl").open()][10:12]
    questions = general.load_general_task("rte", n=2)
    for record, q in zip(records, questions):
        assert q.choices == ("True", "False")
        assert q.choices[q.answer] == ("True" if record["label"] == 0 else "False")
        assert record["sentence2"] in q.prompt
    nli = general.load_general_task("nli", n=4)
    raw = [json.loads(line) for line in (data_dir / "general" / "nli.jsonl").open()][10:14]
    assert [q.choices[q.answer] for q in nli] == [
        "True" if r["label"] == "entailment" else "False" for r in raw]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown general-ability task 'glue'"):
        general.load_general_task("glue")
    with pytest.raises(ValueError, match="n must be >= 1"):
        general.load_general_task("sst2", n=0)
    (tmp_path / "general").mkdir()
    good = json.dumps({"sentence": "fine", "label": 1, "idx": 0})
    (tmp_path / "general" / "sst2.jsonl").write_text("\n".join([good] * 11 + ['{"sentence": "x", "label": 7}']) + "\n")
    with pytest.raises(ValueError, match=r"sst2.jsonl:12: not a sst2 record \(label 7 is not one of"):
        general.load_general_task("sst2", data=tmp_path)
    (tmp_path / "general" / "mrpc.jsonl").write_text("\n".join([good] * 12) + "\n")
    with pytest.raises(ValueError, match=r"mrpc.jsonl:11: not a mrpc record \(missing field 'sentence1'\)"):
        general.load_general_task("mrpc", data=tmp_path)
    with pytest.raises(FileNotFoundError, match="cola.jsonl"):
        general.load_general_task("cola", data=tmp_path)
