"""KV-cache generation against full forwards without a cache, and against transformers' greedy generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_flax import config, model
from llama3_flax.generate import generate

from .reference import padded_batch, torch_model

STEPS = 10
TOP_K = 5


@pytest.fixture(scope="module")
def setup():
    cfg = config.tiny(num_hidden_layers=3, rope_scaling=config.RopeScaling(8.0, 1.0, 4.0, 16))
    params = model.init_params(cfg, jax.random.PRNGKey(5), std=0.3)  # peaked logits: no near-ties
    tokens, mask = padded_batch(np.random.default_rng(4), [9, 4, 1, 6], cfg.vocab_size, "left",
                                pad_id=cfg.pad_token_id)
    return cfg, params, tokens, mask


class FullForward:
    """Full forwards without a cache over a fixed-width buffer (one compilation): the left-padded prompt,
    then the tokens chosen so far, then masked-out slots. Gives the logits at the last chosen slot."""

    def __init__(self, cfg, params, tokens, mask):
        self.cfg, self.params, self.t = cfg, params, tokens.shape[1]
        self.tokens = np.concatenate([tokens, np.zeros((len(tokens), STEPS), tokens.dtype)], 1)
        self.mask = np.concatenate([mask, np.zeros((len(mask), STEPS), mask.dtype)], 1)
        self.step = 0

    def logits(self):
        out = model.forward(self.params, self.cfg, jnp.asarray(self.tokens), jnp.asarray(self.mask))
        return np.asarray(out[:, self.t - 1 + self.step])

    def append(self, new):
        self.tokens[:, self.t + self.step], self.mask[:, self.t + self.step] = new, 1
        self.step += 1


def test_greedy_equals_argmax_of_full_forwards(setup):
    cfg, params, tokens, mask = setup
    got = np.asarray(generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0), STEPS))
    assert got.shape == (len(tokens), STEPS)
    ref, want, margins = FullForward(cfg, params, tokens, mask), [], []
    for _ in range(STEPS):
        logits = ref.logits()
        top2 = np.sort(logits, -1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        nxt = logits.argmax(-1).astype(np.int32)
        want.append(nxt)
        ref.append(nxt)
    assert np.min(margins) > 1e-4, "test needs logits without near-ties"
    np.testing.assert_array_equal(got, np.stack(want, 1))
    assert len(np.unique(got)) > 3  # not a degenerate constant continuation


def test_greedy_equals_transformers_generate(setup):
    import torch

    cfg, params, tokens, mask = setup
    ref = torch_model(cfg, params)
    with torch.inference_mode():
        out = ref.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                           attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=STEPS,
                           min_new_tokens=STEPS, do_sample=False, pad_token_id=cfg.pad_token_id)
    want = out[:, tokens.shape[1]:].numpy()
    got = np.asarray(generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0), STEPS))
    np.testing.assert_array_equal(got, want)


def test_top_k_samples_only_within_top_k(setup):
    cfg, params, tokens, mask = setup
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
    got = np.asarray(generate(params, cfg, tokens_j, mask_j, jax.random.PRNGKey(1), STEPS, top_k=TOP_K,
                              temperature=2.0))
    ref, not_argmax = FullForward(cfg, params, tokens, mask), 0
    for step in range(STEPS):
        logits = ref.logits()
        top = np.argsort(logits, -1)[:, -TOP_K:]
        for b in range(len(tokens)):
            assert got[b, step] in top[b], (b, step)
        not_argmax += int((got[:, step] != logits.argmax(-1)).sum())
        ref.append(got[:, step])
    assert not_argmax > 0, "top-k sampling never left the argmax: not sampling"


def test_top_k_is_reproducible_per_seed(setup):
    cfg, params, tokens, mask = setup
    run = lambda seed: np.asarray(generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                           jax.random.PRNGKey(seed), STEPS, top_k=TOP_K, temperature=2.0))
    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_at_low_temperature_is_greedy(setup):
    cfg, params, tokens, mask = setup
    args = (params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(9), STEPS)
    np.testing.assert_array_equal(np.asarray(generate(*args, top_k=TOP_K, temperature=1e-4)),
                                  np.asarray(generate(*args)))
