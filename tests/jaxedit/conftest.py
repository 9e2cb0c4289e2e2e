import jax
import pytest

from llama3_flax import config, model


@pytest.fixture(scope="session")
def tiny_with_tokenizer(smollm2):
    """A tiny random Llama-3-style model sharing SmolLM2's tokenizer (vocabulary 49152)."""
    _, _, tok = smollm2
    cfg = config.tiny(num_hidden_layers=3, vocab_size=49152)
    params = model.init_params(cfg, jax.random.PRNGKey(3), std=0.05)
    return cfg, params, tok


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
