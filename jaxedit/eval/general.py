"""What an edit does to everything else: general-ability accuracy and held-out perplexity.

Both read NLLs from the packed prefix-tree scoring (jaxedit.eval.scoring) in one pass: a question's
label words share its prompt's tokens, and perplexity windows are (first token, rest) pairs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

from jaxedit.data.corpus import read_text_corpus, special_prefix
from jaxedit.data.general import ChoiceQuestion
from jaxedit.eval import scoring


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """Accuracy on one task's questions: predictions are the label words of lowest mean token NLL."""

    task: str
    accuracy: float
    n: int
    chance: float
    predictions: tuple[int, ...]
    choice_nll: tuple[tuple[float, ...], ...]  # per question, mean token NLL of each choice

    def as_record(self) -> dict:
        return {"task": self.task, "accuracy": self.accuracy, "n": self.n, "chance": self.chance}


def general_accuracy(params, cfg, tokenizer, tasks: Mapping[str, Sequence[ChoiceQuestion]], *,
                     batch_size: int = 16, row_width: int = 128, progress: bool | None = None
                     ) -> dict[str, TaskScore]:
    """{task: TaskScore} for every task's questions, all (prompt, label word) pairs in one scoring pass.

    A prediction compares the label words' mean per-token NLL after the prompt (a length-normalised
    log-probability, as the general-ability protocols of the editing papers do); ties go to the first.
    """
    pairs, spans = [], []
    for task, questions in tasks.items():
        if not questions:
            raise ValueError(f"general-ability task {task!r} has no questions")
        for q in questions:
            spans.append((task, q, len(pairs)))
            pairs += [(q.prompt, c) for c in q.choices]
    nll = scoring.score_pairs(params, cfg, tokenizer, pairs, batch_size=batch_size, row_width=row_width,
                              progress=progress)
    per_task: dict[str, list] = {task: [] for task in tasks}
    for task, q, start in spans:
        mine = nll[start:start + len(q.choices)]
        per_task[task].append((q, int(np.argmin(mine)), tuple(float(x) for x in mine)))
    out = {}
    for task, rows in per_task.items():
        correct = [pred == q.answer for q, pred, _ in rows]
        out[task] = TaskScore(task=task, accuracy=float(np.mean(correct)), n=len(rows),
                              chance=float(np.mean([q.chance for q, _, _ in rows])),
                              predictions=tuple(p for _, p, _ in rows), choice_nll=tuple(c for _, _, c in rows))
    return out


@dataclasses.dataclass(frozen=True)
class HeldoutText:
    """Fixed token windows of held-out text for perplexity: each window's first token is context,
    the rest are scored (with a BOS-using tokenizer, BOS is the context and every text token is scored)."""

    windows: tuple[tuple[int, ...], ...]
    source: str

    @property
    def n_scored(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def heldout_text(tokenizer, path: str | os.PathLike, n_tokens: int = 16384, window: int = 128) -> HeldoutText:
    """At most n_tokens scored tokens from the start of a text file (e.g. WikiText-103 test), in windows.

    Documents are tokenised one by one and cut into windows of `window` tokens (the special prefix,
    e.g. BOS, starts every window); a document's last window may be shorter, windows under 8 tokens
    are dropped.
    """
    if n_tokens < 1 or window < 8:
        raise ValueError(f"n_tokens must be >= 1 and window >= 8, got {n_tokens} and {window}")
    prefix = special_prefix(tokenizer)
    body = window - len(prefix)
    windows: list[tuple[int, ...]] = []
    scored = 0
    for doc in read_text_corpus(path):
        ids = list(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        for i in range(0, len(ids), body):
            if n_tokens - scored < 7:  # what is left would make a window under 8 tokens
                return HeldoutText(tuple(windows), str(path))
            w = tuple(prefix + ids[i:i + body])[:n_tokens - scored + 1]  # the last window ends at n_tokens
            if len(w) >= 8:
                windows.append(w)
                scored += len(w) - 1
    if not windows:
        raise ValueError(f"{path}: no text to score")
    return HeldoutText(tuple(windows), str(path))


def perplexity(params, cfg, text: HeldoutText, *, batch_size: int = 16, progress: bool | None = None) -> float:
    """exp(mean token NLL) over the held-out windows (each token given the earlier ones of its window)."""
    encoded = [scoring.EncodedPair(prompt_ids=w[:1], target_ids=w[1:]) for w in text.windows]
    width = max(len(w) for w in text.windows)
    mean = scoring.score_encoded(params, cfg, encoded, batch_size=batch_size, row_width=width, progress=progress)
    counts = np.asarray([len(w) - 1 for w in text.windows], np.float64)
    return float(math.exp(float(np.sum(mean * counts) / np.sum(counts))))
