"""Sequences longer than the model's positions and token ids outside its vocabulary end in a clear error."""
import dataclasses

import pytest

from jaxedit import testing
from jaxedit.editing import tokenize
from jaxedit.editing.keys import keys_at_layers, outputs_at_subject
from jaxedit.eval import generation
from jaxedit.requests import EditRequest


@pytest.fixture(scope="module")
def short_model():
    """A tiny model that takes at most 12 positions."""
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2, vocab_size=128)
    return cfg.replace(max_position_embeddings=12), params, tok


def test_check_lengths_names_count_limit_and_what():
    cfg = testing.tiny_model(num_hidden_layers=1)[0].replace(max_position_embeddings=12)
    tokenize.check_lengths([3, 12, 5], cfg, "prompt of case 3")  # exactly the limit is fine
    tokenize.check_lengths([], cfg, "nothing")
    with pytest.raises(ValueError, match=r"prompt of case 3: a sequence of 13 tokens is longer than the model's "
                                         r"max_position_embeddings \(12\)"):
        tokenize.check_lengths([3, 13, 5], cfg, "prompt of case 3")


def test_check_token_ids():
    cfg = testing.tiny_model(num_hidden_layers=1, vocab_size=128)[0]
    tokenize.check_token_ids([[0, 127]], cfg, "rows")
    with pytest.raises(ValueError, match=r"rows: token id 128 is outside the model's vocabulary \(vocab_size 128\)"):
        tokenize.check_token_ids([[0, 128]], cfg, "rows")
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tokenize.check_token_ids([-1], cfg, "rows")


LONG = EditRequest("In the old days the people of the town said that {} was", "Toko Yasuda", "piano", case_id=3)
SHORT = EditRequest("{} plays the", "Toko Yasuda", "piano", case_id=4)


def test_keys_and_outputs_reject_prompts_longer_than_the_positions(short_model):
    cfg, params, tok = short_model
    assert keys_at_layers(params, cfg, tok, [SHORT], (("{}",),), [0]).shape == (1, 1, cfg.intermediate_size)
    with pytest.raises(ValueError, match=r"^bare prompt of case 3: a sequence of 15 tokens .*max_position_embeddings \(12\)"):
        outputs_at_subject(params, cfg, tok, [SHORT, LONG], 1)
    with pytest.raises(ValueError, match=r"^context-template prompt of case 4: a sequence of 14 tokens"):
        keys_at_layers(params, cfg, tok, [SHORT, dataclasses.replace(SHORT, case_id=5)],
                       (("{}",), ("Once upon a time there was a town where {}",)), [0])


def test_generation_checks_prompt_plus_new_tokens_and_ids(short_model):
    cfg, params, tok = short_model
    spec = generation.GenerationSpec(max_new_tokens=4, batch_size=2)
    assert len(generation.generate_texts(params, cfg, tok, ["France is"], spec)) == 1
    with pytest.raises(ValueError, match=r"generation prompt \+ max_new_tokens \(10\): a sequence of 13 tokens"):
        generation.generate_texts(params, cfg, tok, ["France is"], generation.GenerationSpec(max_new_tokens=10))
    with pytest.raises(ValueError, match=r"generation prompt 'the capital': token id \d+ is outside .*vocab_size 128"):
        generation.generate_texts(params, cfg, testing.WordTokenizer(100_000), ["the capital"], spec)
