"""A tiny random model shared by the evaluation tests."""
import jax
import pytest

from llama3_flax import config as lconfig
from llama3_flax import model as lmodel


@pytest.fixture(scope="module")
def tiny():
    cfg = lconfig.tiny(vocab_size=96)
    return cfg, lmodel.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
