"""Next-token log-probabilities at each prompt's last token, against the full forward's logits, and KL."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import testing
from jaxedit.eval import drift
from llama3_flax import config as lconfig, model as lmodel

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Lyon is a twin city of", "Toko Yasuda plays the"]


def test_last_token_logprobs_match_the_forward_and_kl():
    cfg = lconfig.tiny(num_hidden_layers=2, vocab_size=256)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(  # NumPy weights: no random-number programs to compile
        lambda path, shape: jnp.asarray((1.0 + 0.1 * rng.standard_normal(shape)) if "norm" in jax.tree_util.keystr(path)
                                        else 0.1 * rng.standard_normal(shape), jnp.float32),
        lmodel.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    tok = testing.WordTokenizer(256)
    got = drift.last_token_logprobs(params, cfg, tok, PROMPTS, batch_size=2)  # two chunks, the last padded
    for i, p in enumerate(PROMPTS):
        ids = tok(p)["input_ids"]
        logits = np.asarray(lmodel.forward(params, cfg, jnp.asarray([ids])), np.float64)[0, -1]
        want = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        np.testing.assert_allclose(got[i], want, atol=2e-5)
    kl = drift.kl_divergence(got, got[::-1])
    assert kl[1] == 0.0 and kl[0] > 0 and kl[2] > 0
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    np.testing.assert_allclose(drift.kl_divergence(p, q), 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
