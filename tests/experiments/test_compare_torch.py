"""jaxedit against the PyTorch reference on a tiny random model with a character tokenizer."""
import jax
import jax.numpy as jnp
import pytest

from experiments import compare_torch
from jaxedit.editing import covariance
from jaxedit import hparams
from jaxedit.requests import EditRequest
from llama3_flax import config, model
from jaxedit.testing import CharTokenizer


REQUESTS = (
    EditRequest(prompt="{} lives in", subject="Ada", target_new="Rome", target_true="Oslo", case_id=0,
                paraphrase_prompts=("Where does Ada live? In",), neighborhood_prompts=("Bob lives in",)),
    EditRequest(prompt="The sport of {} is", subject="Kim Lee", target_new="golf", target_true="judo", case_id=1,
                paraphrase_prompts=("Kim Lee plays",), neighborhood_prompts=("The sport of Sam is",)),
    EditRequest(prompt="{}, made by", subject="Zeta 5", target_new="Sony", target_true="Acme", case_id=2,
                paraphrase_prompts=("Zeta 5 is a product of",), neighborhood_prompts=("Iota 2, made by",)),
)
TEMPLATES = (("{}",), ("Once upon a time. {}", "It was cold. {}"))


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=3)
    params = model.init_params(cfg, jax.random.PRNGKey(0), std=0.05)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 40), 3, cfg.vocab_size)
    sums, count = covariance.covariance_pass(params, cfg, tokens, jnp.ones_like(tokens), jnp.asarray([1]))
    return cfg, params, {1: sums[0] / count}


def test_tiny_agreement(tiny):
    cfg, params, C = tiny
    value = hparams.ValueHparams(v_num_grad_steps=6)
    hps = {m: hparams.EditHparams(method=m, layers=(1,), value=value, mom2_update_weight=w)
           for m, w in (("memit", 10.0), ("emmet", 100.0))}
    c = compare_torch.compare(params, cfg, CharTokenizer(), REQUESTS, hps, C, TEMPLATES, torch_threads=1,
                              warmup=False, log=lambda *a: None)
    a = c.agreement
    assert a["keys L1"] < 1e-5
    assert a["value init"] < 1e-5 and a["value delta"] < 1e-3
    assert a["value steps equal (cases)"] == len(REQUESTS)
    assert a["Delta W memit L1"] < 1e-2 and a["Delta W emmet L1"] < 1e-2
    assert a["Delta W memit (same K, R)"] < 1e-5 and a["Delta W emmet (same K, R)"] < 1e-5
    assert c.es_mismatch == {"memit": 0, "emmet": 0}
    for m in ("memit", "emmet"):
        assert c.metrics[f"{m} jaxedit"].es == c.metrics[f"{m} PyTorch"].es
    assert set(c.seconds) >= {"values", "keys[memit]", "solve[emmet]", "total[memit]"}
    text = compare_torch.format_report(c)
    assert "Delta W emmet L1" in text and "ratio" in text and "memit PyTorch" in text
