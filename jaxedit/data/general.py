"""General-ability test sets (GLUE subsets and MMLU in $JAXEDIT_DATA/general) as choice questions.

Each example becomes a zero-shot prompt and a few label words; the model's answer is the label word
with the lowest mean per-token NLL after the prompt (jaxedit.eval.general). This is the likelihood
protocol of the sequential-editing papers (AlphaEdit, ENCORE): records 0-9 of every file are their
few-shot pool, so test questions start at record 10.

Labels follow the data's own definitions. In RTE, label 0 is entailment (GLUE's convention), so its
True/False answer is True for 0; NLI (RTE's training split, string labels) maps "entailment" to True.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Mapping

from jaxedit.data.paths import data_dir

FEW_SHOT_POOL = 10  # records 0..9 of every file; test questions start after them


@dataclasses.dataclass(frozen=True)
class ChoiceQuestion:
    """One test question: the prompt, its candidate answers (label words, scored after a space) and
    the index of the correct one."""

    task: str
    prompt: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self):
        if not self.prompt.strip():
            raise ValueError(f"{self.task}: empty prompt")
        if len(self.choices) < 2 or not all(c.strip() for c in self.choices):
            raise ValueError(f"{self.task}: a question needs at least two non-empty choices, got {self.choices}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"{self.task}: answer {self.answer} is not one of the {len(self.choices)} choices")

    @property
    def chance(self) -> float:
        return 1.0 / len(self.choices)


def _label(record: Mapping, mapping: Mapping) -> int:
    value = record["label"]
    if value not in mapping:
        raise ValueError(f"label {value!r} is not one of {sorted(mapping, key=str)}")
    return mapping[value]


def _sst2(r):
    return f"Review: {r['sentence'].strip()}\nSentiment:", ("negative", "positive"), _label(r, {0: 0, 1: 1})


def _mrpc(r):
    prompt = (f"Are the following two sentences paraphrases of each other?\nSentence 1: {r['sentence1']}\n"
              f"Sentence 2: {r['sentence2']}\nAnswer:")
    return prompt, ("No", "Yes"), _label(r, {0: 0, 1: 1})


def _cola(r):
    prompt = f"Is the following sentence grammatically acceptable?\n{r['sentence']}\nAnswer:"
    return prompt, ("No", "Yes"), _label(r, {0: 0, 1: 1})


def _rte(r):  # GLUE: 0 = entailment -> True (index 0 of the choices)
    prompt = f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:"
    return prompt, ("True", "False"), _label(r, {0: 0, 1: 1})


def _nli(r):
    prompt = f"{r['sentence1']} entails the {r['sentence2']} True or False?\nAnswer:"
    return prompt, ("True", "False"), _label(r, {"entailment": 0, "not_entailment": 1})


def _mmlu(r):
    choices = r["choices"]
    if len(choices) != 4:
        raise ValueError(f"expected 4 choices, got {len(choices)}")
    options = "\n".join(f"({letter}) {text}" for letter, text in zip("ABCD", choices))
    answer = r["answer"]
    if answer not in (0, 1, 2, 3):
        raise ValueError(f"answer {answer!r} is not 0-3")
    return f"Question: {r['question']}\n{options}\nAnswer:", ("A", "B", "C", "D"), answer


PROMPTS: dict[str, Callable[[Mapping], tuple[str, tuple[str, ...], int]]] = {
    "sst2": _sst2, "mrpc": _mrpc, "cola": _cola, "rte": _rte, "nli": _nli, "mmlu": _mmlu}
TASKS = tuple(PROMPTS)


def task_file(task: str, data: str | os.PathLike | None = None) -> Path:
    if task not in PROMPTS:
        raise ValueError(f"unknown general-ability task {task!r}; known: {', '.join(TASKS)}")
    path = data_dir(data) / "general" / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"general-ability file {str(path)!r} does not exist")
    return path


def load_general_task(task: str, n: int | None = 100, *, start: int = FEW_SHOT_POOL,
                      data: str | os.PathLike | None = None) -> tuple[ChoiceQuestion, ...]:
    """Questions `start`.. (up to n of them) of a task's file, as ChoiceQuestions.

    Args:
      task: one of TASKS.
      n: how many (None: all after `start`); the published protocol uses 100.
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 (or None for all), got {n}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    path = task_file(task, data)
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line_no <= start:
                continue
            if n is not None and len(out) == n:
                break
            try:
                record = json.loads(line)
                prompt, choices, answer = PROMPTS[task](record)
                out.append(ChoiceQuestion(task, prompt, choices, answer))
            except (ValueError, KeyError, TypeError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{path}:{line_no}: not a {task} record ({what})") from None
    if not out:
        raise ValueError(f"{path}: no questions after record {start}")
    return tuple(out)


def load_general_tasks(tasks=TASKS, n: int | None = 100, data: str | os.PathLike | None = None
                       ) -> dict[str, tuple[ChoiceQuestion, ...]]:
    """{task: questions} for several tasks (the monitors' default: all six, 100 questions each)."""
    return {task: load_general_task(task, n, data=data) for task in tasks}
