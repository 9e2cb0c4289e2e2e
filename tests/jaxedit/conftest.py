import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model


@pytest.fixture(scope="session")
def tiny_with_tokenizer(smollm2):
    """A tiny random Llama-3-style model sharing SmolLM2's tokenizer (vocabulary 49152)."""
    _, _, tok = smollm2
    cfg = config.tiny(num_hidden_layers=3, vocab_size=49152)
    params = model.init_params(cfg, jax.random.PRNGKey(3), std=0.05)
    return cfg, params, tok


@pytest.fixture(scope="session")
def tiny_covariance(tiny_with_tokenizer):
    """A well-conditioned random SPD stand-in for C0 of the tiny model's MLP width."""
    cfg = tiny_with_tokenizer[0]
    rng = np.random.RandomState(0)
    a = rng.randn(cfg.intermediate_size, 4 * cfg.intermediate_size)
    return jnp.asarray(a @ a.T / a.shape[1] + 0.1 * np.eye(cfg.intermediate_size), jnp.float32)


WIKITEXT = """ 
 = First Article = 
 
 The first article begins here . It has two paragraphs . 
 
 = = A Section = = 
 
 Section text of the first article . 
 = = = A Subsection = = = 
 More text . 
 
 = Second Article = 
 
 Body of the second article . 
 
"""


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.tokens"
    path.write_text(WIKITEXT * 3)
    return path
