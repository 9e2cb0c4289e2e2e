"""The known facts of causal tracing (the ROME paper's known_1000.json), tokenised for a model.

Each record has known_id, subject, attribute and prompt (the subject written inline, e.g. "Vinson
Massif is located in the continent of" -> "Antarctica"); other fields are kept out. A fact is traced
only if the model knows it (its greedy next token starts the attribute); the others are skipped with
a reason, and callers count them.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from jaxedit.data import paths
from jaxedit.data.facts import read_json_list
from jaxedit.editing.tokenize import encode_prompt, encode_target

REQUIRED = ("known_id", "subject", "attribute", "prompt")


class KnownsFileError(ValueError):
    """A knowns file that cannot be read as facts; the message names the file and the record."""


class SubjectTokensError(ValueError):
    """The subject's first or last character falls inside a token of the prompt."""


@dataclasses.dataclass(frozen=True)
class KnownFact:
    known_id: int
    subject: str
    attribute: str
    prompt: str

    @property
    def name(self) -> str:
        return f"known_id {self.known_id} ({self.subject!r})"


@dataclasses.dataclass(frozen=True)
class EncodedFact:
    """A fact's prompt as tokens, the subject's token range [start, end), and the token ids that
    count as the attribute's first token (of " " + attribute, and of the attribute alone)."""

    fact: KnownFact
    tokens: tuple[int, ...]
    subject: tuple[int, int]
    answers: tuple[int, ...]


def default_knowns_file() -> Path:
    return paths.data_dir() / "knowns" / "known_1000.json"


def read_knowns(path: str | os.PathLike | None = None) -> tuple[KnownFact, ...]:
    """The facts of a knowns JSON file (a list of records), in file order.

    Raises:
      FileNotFoundError: no such file.
      KnownsFileError: not a JSON list, no facts, a missing field, or a subject that is not in its
        prompt (naming the record and its known_id).
    """
    path = default_knowns_file() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no knowns file at {path}")
    data = read_json_list(path, KnownsFileError)
    if not data:
        raise KnownsFileError(f"{path}: the file holds no facts")
    return tuple(_fact(record, f"{path}, record {i}") for i, record in enumerate(data))


def _fact(record, where: str) -> KnownFact:
    if not isinstance(record, dict):
        raise KnownsFileError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise KnownsFileError(f"{where}: missing field(s) {missing}")
    for name in REQUIRED[1:]:
        if not isinstance(record[name], str) or not record[name].strip():
            raise KnownsFileError(f"{where} (known_id {record['known_id']}): field {name!r} must be a non-empty string")
    fact = KnownFact(int(record["known_id"]), record["subject"], record["attribute"], record["prompt"])
    if fact.subject not in fact.prompt:
        raise KnownsFileError(f"{where}: {fact.name}: the subject is not in its prompt {fact.prompt!r}")
    return fact


def encode_fact(tokenizer, fact: KnownFact) -> EncodedFact:
    """Tokenises the prompt and finds the subject's tokens (its first occurrence).

    The range comes from tokenising the text before the subject and the text up to its end (BOS
    included when the tokenizer adds one); both must be prefixes of the prompt's tokens.

    Raises:
      SubjectTokensError: a subject boundary falls inside a token (e.g. a subject that ends inside
        a word), so no token range holds exactly the subject.
    """
    tokens = encode_prompt(tokenizer, fact.prompt)
    at = fact.prompt.index(fact.subject)
    # A space before the subject belongs to its first token.
    before = encode_prompt(tokenizer, fact.prompt[:at].rstrip())
    through = encode_prompt(tokenizer, fact.prompt[:at + len(fact.subject)])
    start, end = len(before), len(through)
    if tokens[:start] != before or tokens[:end] != through or end <= start:
        raise SubjectTokensError(f"{fact.name}: the subject's boundaries are not token boundaries of the prompt")
    answers = (encode_target(tokenizer, fact.attribute)[0],
               *tokenizer(fact.attribute.strip(), add_special_tokens=False)["input_ids"][:1])
    return EncodedFact(fact, tuple(tokens), (start, end), tuple(dict.fromkeys(answers)))


def encode_facts(tokenizer, facts: Sequence[KnownFact]) -> list[EncodedFact | SubjectTokensError]:
    """Each fact encoded, or the SubjectTokensError that keeps it from being traced (callers count it)."""
    out = []
    for fact in facts:
        try:
            out.append(encode_fact(tokenizer, fact))
        except SubjectTokensError as e:
            out.append(e)
    return out


def subject_token_ids(facts: Sequence[EncodedFact | Exception]) -> list[int]:
    """Every encoded fact's subject tokens (with repeats), whose embeddings set the corruption noise's
    scale; facts that could not be encoded are left out."""
    return [t for f in facts if isinstance(f, EncodedFact) for t in f.tokens[f.subject[0]:f.subject[1]]]
