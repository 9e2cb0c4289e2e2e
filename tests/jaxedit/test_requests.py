import pytest

from jaxedit.requests import EditRequest, validate_batch


def make(**kw):
    base = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                target_true="French", case_id=7)
    base.update(kw)
    return EditRequest(**base)


def test_valid_request_and_properties():
    r = make()
    assert r.prefix == "The mother tongue of "
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert r.name == "case 7"


@pytest.mark.parametrize("field,value,message", [
    ("prompt", "The mother tongue of Danielle is", "exactly one '{}'"),
    ("prompt", "{} and {} speak", "exactly one '{}'"),
    ("subject", "", "'subject' is empty"),
    ("subject", "   ", "'subject' is empty"),
    ("target_new", "", "'target_new' is empty"),
    ("target_true", " ", "'target_true' is empty"),
    ("target_new", 3, "'target_new' must be a string"),
    ("subject", None, "'subject' must be a string"),
    ("paraphrase_prompts", "a prompt", "must be a sequence of strings"),
    ("neighborhood_prompts", ["ok", 5], "must contain only strings"),
])
def test_validation_names_request_and_field(field, value, message):
    with pytest.raises(ValueError) as err:
        make(**{field: value})
    assert message in str(err.value)
    assert "case 7" in str(err.value)


def test_from_filled_subject_not_in_prompt():
    with pytest.raises(ValueError, match="subject 'Paris' is not in the prompt"):
        EditRequest.from_filled("The capital of France is", "Paris", "Lyon", case_id=1)
    r = EditRequest.from_filled("The capital of France is", "France", "Italy", case_id=2)
    assert r.prompt == "The capital of {} is"


def test_validate_batch():
    with pytest.raises(ValueError, match="no edit requests"):
        validate_batch([])
    with pytest.raises(TypeError, match="request 1 is a dict"):
        validate_batch([make(), {"prompt": "x"}])
    assert len(validate_batch([make(), make(case_id=8)])) == 2


class DroppingTokenizer:
    """Word-level stand-in that, like some SentencePiece vocabularies, drops characters it lacks."""

    def __call__(self, text, add_special_tokens=True):
        words = [w for w in text.replace("\u200b", "").split() if w]
        return {"input_ids": ([1] if add_special_tokens else []) + [hash(w) % 1000 + 3 for w in words]}


def test_subject_that_tokenises_to_nothing():
    from jaxedit.editing.keys import subject_last_index
    r = make(subject="\u200b")
    with pytest.raises(ValueError, match="case 7: field 'subject' .* tokenises to nothing"):
        subject_last_index(DroppingTokenizer(), "The mother tongue of ", r)
    assert subject_last_index(DroppingTokenizer(), "The mother tongue of ", make()) == 6


@pytest.mark.parametrize("case_id", [[1, 2], {"id": 1}, {3}, 1.5, True])
def test_case_id_must_be_int_str_or_none(case_id):
    with pytest.raises(ValueError, match=r"field 'case_id' must be an int, a str or None, got "
                                         + type(case_id).__name__):
        make(case_id=case_id)


def test_numpy_integer_case_id_becomes_int():
    import numpy as np

    r = make(case_id=np.int64(12))
    assert type(r.case_id) is int and r.case_id == 12 and r.name == "case 12"
    assert {r.case_id: r}[12] is r
    assert make(case_id="cf-3").case_id == "cf-3" and make(case_id=None).name == "'Danielle Darrieux'"


@pytest.mark.parametrize("target_true", ["English", " English ", "English "])
def test_target_new_equal_to_target_true_is_nothing_to_edit(target_true):
    with pytest.raises(ValueError, match="case 7: field 'target_new' equals target_true .*nothing to edit"):
        make(target_new="English", target_true=target_true)
    assert make(target_new="english", target_true="English").target_new == "english"  # case-sensitive


def test_validate_batch_rejects_one_fact_with_two_targets():
    a, b = make(case_id=1), make(case_id=2, target_new="German")
    with pytest.raises(ValueError, match=r"conflicting requests 0 \(case 1\) and 2 \(case 2\).*"
                                         r"'English' vs 'German'"):
        validate_batch([a, make(case_id=3, subject="Toko Yasuda"), b])
    # the same fact asked twice with the same target, or other prompts of the subject, are fine
    assert len(validate_batch([a, make(case_id=4), make(case_id=5, prompt="{} speaks", target_new="German")])) == 3
    # a sequence edited batch after batch may revise a fact
    assert len(validate_batch([a, b], one_batch=False)) == 2
