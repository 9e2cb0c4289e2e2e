"""A stored value that is not one value of the cache's model (another width, a missing field, a torn
file) is recomputed and said so, never served to the edit."""
import logging

import jax.numpy as jnp
import numpy as np

from experiments import value_cache, world
from jaxedit import testing
from jaxedit.editing import editor
from jaxedit.editing.values import Values
from jaxedit.requests import EditRequest


def _row(width):
    return {"target": np.ones(width, np.float32), "init": np.zeros(width, np.float32),
            "delta": np.ones(width, np.float32), "loss": np.float32(0), "nll": np.float32(0), "steps": np.int32(3)}


def test_a_stored_value_of_the_wrong_width_is_recomputed(tmp_path, monkeypatch, caplog):
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    hp, groups = world.hparams_for("tiny-random", "memit"), (("{}",), ("The day . {}",))
    computed = []

    def values_of_the_right_width(params, cfg, tok, requests, hp, **kwargs):  # the optimisation is not under test
        computed.append(len(requests))
        n, d = len(requests), cfg.hidden_size
        return Values(target=jnp.ones((n, d)), init=jnp.zeros((n, d)), delta=jnp.ones((n, d)), loss=jnp.zeros(n),
                      nll=jnp.zeros(n), steps=jnp.ones(n, jnp.int32))
    monkeypatch.setattr(editor, "edit_values", values_of_the_right_width)
    cache = value_cache.ValueCache(params, cfg, tok, tmp_path)
    request = EditRequest(prompt="The capital of {} is", subject="France", target_new="Paris", case_id=7)
    folder = cache.dir / value_cache._folder_key(cache.fingerprint, cache.tokenizer_fingerprint, hp, groups)
    folder.mkdir(parents=True)
    path = folder / value_cache.request_file_name(request)
    np.savez(path, **_row(cfg.hidden_size + 3))  # a value of a wider model, under this request's name
    with caplog.at_level(logging.WARNING):
        got = cache.get([request], hp, groups)
    assert computed == [1], "a stored value of another width was served"
    assert got.target.shape == (1, cfg.hidden_size)
    assert str(path) in caplog.text and "where the model needs (64,); recomputing it" in caplog.text
    assert value_cache._stored_row(path, cfg.hidden_size)[0] is not None  # replaced by the recomputed value


def test_what_is_wrong_with_a_stored_value_is_said(tmp_path):
    np.savez(tmp_path / "ok.npz", **_row(4))
    assert value_cache._stored_row(tmp_path / "ok.npz", 4)[1] == ""
    assert "of shape (4,) for 'target' where the model needs (8,)" in value_cache._stored_row(tmp_path / "ok.npz", 8)[1]
    np.savez(tmp_path / "no-steps.npz", **{k: v for k, v in _row(4).items() if k != "steps"})
    assert value_cache._stored_row(tmp_path / "no-steps.npz", 4) == (None, "without the field(s) ['steps']")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    assert value_cache._stored_row(tmp_path / "torn.npz", 4)[1].startswith("unreadable")
