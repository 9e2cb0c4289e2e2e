"""Target NLL maths on hand-made logits with known answers."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.eval import nll


def _p(x):
    return np.log(np.asarray(x, np.float32))


def test_mean_target_nll_hand_logits():
    # Two rows, 3 target slots, vocabulary of 4. Logits are log-probabilities (already normalised), plus
    # a constant shift in row 1 that log_softmax must remove.
    p0 = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]]
    p1 = [[0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02], [0.1, 0.2, 0.3, 0.4]]
    logits = jnp.array([_p(p0), _p(p1) + 5.0])
    ids = jnp.array([[3, 1, 0], [2, 0, 0]])
    valid = jnp.array([[1, 1, 0], [1, 0, 0]])  # row 0: 2-token target; row 1: 1 token
    got = np.asarray(nll.mean_target_nll(logits, ids, valid))
    want = [(-math.log(0.4) - math.log(0.25)) / 2, -math.log(0.25)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a row without any valid slot scores 0 (dummy rows), not nan
    assert float(nll.mean_target_nll(logits[:1], ids[:1], jnp.zeros((1, 3)))[0]) == 0.0
    np.testing.assert_allclose(np.asarray(nll.token_nll(logits[0], ids[0])),
                               [-math.log(0.4), -math.log(0.25), -math.log(0.7)], rtol=1e-6)


def test_sequence_target_nll_reads_logits_before_each_target_token():
    # tokens: [BOS, a, b | t1, t2] with the target at positions 3, 4; vocabulary of 4.
    tokens = jnp.array([[1, 2, 3, 0, 2]])
    target_mask = jnp.array([[0, 0, 0, 1, 1]])
    probs = np.full((1, 5, 4), 0.25, np.float32)
    probs[0, 2] = [0.6, 0.2, 0.1, 0.1]   # predicts token 3 (= 0): p 0.6
    probs[0, 3] = [0.1, 0.1, 0.3, 0.5]   # predicts token 4 (= 2): p 0.3
    logits = jnp.asarray(np.log(probs))
    want = (-math.log(0.6) - math.log(0.3)) / 2
    assert float(nll.sequence_target_nll(logits, tokens, target_mask)[0]) == pytest.approx(want, rel=1e-6)
    # the logits at the last position and before the prompt end do not matter
    changed = logits.at[0, 4].set(jnp.array([9.0, -9, 3, 1])).at[0, 0].set(jnp.array([5.0, 0, 0, 0]))
    assert float(nll.sequence_target_nll(changed, tokens, target_mask)[0]) == pytest.approx(want, rel=1e-6)
