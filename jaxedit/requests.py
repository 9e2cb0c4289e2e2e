"""Edit requests: what to change, and the prompts that judge the change."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One counterfactual edit: (subject, relation, target_true) -> target_new.

    Attributes:
      prompt: the relation's template with exactly one "{}" where the subject goes,
        e.g. "The mother tongue of {} is".
      subject: e.g. "Danielle Darrieux".
      target_new: the new object, e.g. "English" (no leading space; tokenisation adds it).
      target_true: the object the model knew, e.g. "French" (needed for metrics, not for editing).
        It must differ from target_new: that edit would change nothing, and efficacy/neighbourhood
        scores would compare a target with itself.
      case_id: an identifier for error messages and results: an int (numpy integers become int), a
        str or None; it keys dictionaries, so it must be hashable.
      paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts: evaluation
        prompts with the subject already filled in (neighbourhood ones name other subjects).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.case_id, numbers.Integral) and not isinstance(self.case_id, bool):
            object.__setattr__(self, "case_id", int(self.case_id))  # numpy ints print and hash as ints
        elif self.case_id is not None and not isinstance(self.case_id, str):
            raise ValueError(f"EditRequest {self.subject!r}: field 'case_id' must be an int, a str or None, "
                             f"got {type(self.case_id).__name__} {self.case_id!r}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                self._fail(name, f"must be a sequence of strings, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
            for p in value:
                if not isinstance(p, str):
                    self._fail(name, f"must contain only strings, got {type(p).__name__}")
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                self._fail(name, f"must be a string, got {type(value).__name__}")
            if not value.strip():
                self._fail(name, "is empty")
        if self.target_true is not None:
            if not isinstance(self.target_true, str):
                self._fail("target_true", f"must be a string, got {type(self.target_true).__name__}")
            if not self.target_true.strip():
                self._fail("target_true", "is empty")
            if self.target_true.strip() == self.target_new.strip():
                self._fail("target_new", f"equals target_true ({self.target_true.strip()!r}): nothing to edit")
        n = self.prompt.count("{}")
        if n != 1:
            self._fail("prompt", f"must contain exactly one '{{}}' for the subject, found {n}: {self.prompt!r}")

    def _fail(self, field: str, why: str):
        raise ValueError(f"EditRequest {self.name}: field {field!r} {why}")

    @property
    def name(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else repr(self.subject)

    @property
    def prefix(self) -> str:
        """The prompt text before the subject."""
        return self.prompt.split("{}")[0]

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, **kwargs) -> "EditRequest":
        """Builds a request from a prompt with the subject already in it (as CounterFact's reduced format)."""
        if not isinstance(subject, str) or not subject.strip():
            raise ValueError(f"EditRequest {kwargs.get('case_id', subject)!r}: field 'subject' is empty")
        if subject not in prompt:
            raise ValueError(f"EditRequest case {kwargs.get('case_id')}: subject {subject!r} is not in the "
                             f"prompt {prompt!r}")
        i = prompt.index(subject)
        return cls(prompt=prompt[:i] + "{}" + prompt[i + len(subject):], subject=subject,
                   target_new=target_new, **kwargs)


def validate_batch(requests: Sequence[EditRequest], one_batch: bool = True) -> tuple[EditRequest, ...]:
    """Checks a batch: non-empty, all EditRequest, no two asking different targets for one fact.

    Two requests with the same prompt and subject share one key but want different values; an
    equality-constrained solve (EMMET) cannot meet both and least squares (MEMIT) averages them, so
    the layer is damaged and neither edit holds. one_batch=False skips that check, for a sequence
    edited in several batches, where a later request may overwrite an earlier one (each batch is
    then checked on its own).
    """
    requests = tuple(requests)
    if not requests:
        raise ValueError("no edit requests given")
    seen: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise TypeError(f"request {i} is a {type(r).__name__}, not an EditRequest")
        fact = (r.prompt, r.subject)
        if one_batch and fact in seen and seen[fact][1].target_new.strip() != r.target_new.strip():
            j, first = seen[fact]
            raise ValueError(
                f"conflicting requests {j} ({first.name}) and {i} ({r.name}): same prompt {r.prompt!r} and "
                f"subject {r.subject!r}, different target_new ({first.target_new!r} vs {r.target_new!r})")
        seen.setdefault(fact, (i, r))
    return requests
