"""A stored value that is not one value of the cache's model (another width, a missing field) is
recomputed and said so, never served to the edit."""
import logging

import numpy as np
import pytest

from experiments import value_cache
from tests.experiments.test_value_cache import _request, computed, tiny  # noqa: F401  (fixtures)


@pytest.mark.parametrize("damage", ["wider", "no steps"])
def test_a_stored_value_of_the_wrong_shape_is_recomputed(tiny, tmp_path, computed, caplog, damage):  # noqa: F811
    cfg, params, tok, hp, groups = tiny
    first = value_cache.ValueCache(params, cfg, tok, tmp_path).get([_request(7, "Paris")], hp, groups)
    (path,) = tmp_path.glob("values/*/*.npz")
    with np.load(path) as z:
        row = {f: np.array(z[f]) for f in z.files}
    if damage == "wider":
        row = {f: (np.concatenate([v, v[:3]]) if v.ndim else v) for f, v in row.items()}
    else:
        del row["steps"]
    np.savez(path, **row)
    with caplog.at_level(logging.WARNING):
        again = value_cache.ValueCache(params, cfg, tok, tmp_path).get([_request(7, "Paris")], hp, groups)
    assert computed == [["Paris"], ["Paris"]], "a damaged stored value was served"
    assert again.target.shape == (1, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(again.target), np.asarray(first.target), rtol=1e-6, atol=1e-6)
    assert str(path) in caplog.text and "recomputing" in caplog.text
