"""General-ability accuracy and perplexity from the packed scoring pass, against naive per-example loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.data.general import ChoiceQuestion
from jaxedit.eval import general
from llama3_flax import model as lmodel
from tests.jaxedit.eval.vocabulary import word_tokenizer as WordTokenizer


def _naive_nll(params, cfg, prefix, continuation):
    """Mean NLL of `continuation` after `prefix`, from one full forward of the sequence alone."""
    seq = jnp.asarray([list(prefix) + list(continuation)])
    logp = np.asarray(jax.nn.log_softmax(lmodel.forward(params, cfg, seq)[0], axis=-1), np.float64)
    n = len(prefix)
    return -float(np.mean([logp[n + j - 1, t] for j, t in enumerate(continuation)]))


QUESTIONS = {
    "yesno": [ChoiceQuestion("yesno", "Is Paris the capital of France ? Answer:", ("No", "Yes"), 1),
              ChoiceQuestion("yesno", "Is London in Asia ? Answer:", ("No", "Yes"), 0),
              ChoiceQuestion("yesno", "Does Toko Yasuda play the piano ? Answer:", ("No", "Yes"), 1)],
    "letters": [ChoiceQuestion("letters", "The river of the city is\n(A) Paris\n(B) London\nAnswer:",
                               ("A", "B", "C language", "D"), 2)],
}


@pytest.mark.parametrize("add_bos", [True, False])
def test_accuracy_matches_a_naive_loop(tiny, add_bos):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, add_bos)
    got = general.general_accuracy(params, cfg, tok, QUESTIONS, batch_size=2, row_width=16)
    for task, questions in QUESTIONS.items():
        naive = [[_naive_nll(params, cfg, tok(q.prompt)["input_ids"],
                             tok(" " + c, add_special_tokens=False)["input_ids"]) for c in q.choices]
                 for q in questions]
        np.testing.assert_allclose(np.asarray(got[task].choice_nll), naive, rtol=1e-5, atol=1e-5)
        assert got[task].predictions == tuple(int(np.argmin(n)) for n in naive)
        want = np.mean([int(np.argmin(n)) == q.answer for n, q in zip(naive, questions)])
        assert got[task].accuracy == pytest.approx(want) and got[task].n == len(questions)
    assert got["letters"].chance == 0.25 and got["yesno"].chance == 0.5


def test_perplexity_matches_a_direct_computation(tiny, tmp_path):
    cfg, params = tiny
    tok = WordTokenizer(cfg.vocab_size, True)
    text = tmp_path / "heldout.txt"
    text.write_text("the capital of France is Paris and the river of the city is long . " * 6 + "\n\n"
                    "Toko Yasuda plays the guitar in London , a city in Europe .\n")
    held = general.heldout_text(tok, text, n_tokens=60, window=24)
    assert held.n_scored == 60 and all(len(w) <= 24 and w[0] == 1 for w in held.windows)
    got = general.perplexity(params, cfg, held, batch_size=2)
    total, count = 0.0, 0
    for w in held.windows:
        total += _naive_nll(params, cfg, w[:1], w[1:]) * (len(w) - 1)
        count += len(w) - 1
    assert got == pytest.approx(float(np.exp(total / count)), rel=1e-5)
    # a model that predicts uniformly has the vocabulary's size as its perplexity
    uniform = dict(params, lm_head=jnp.zeros_like(params["lm_head"]))
    assert general.perplexity(uniform, cfg, held) == pytest.approx(cfg.vocab_size, rel=1e-5)
    with pytest.raises(ValueError, match="window >= 8"):
        general.heldout_text(tok, text, window=4)
