"""ValueCache serves a stored value only to a request with the same content, whatever its case id."""
import numpy as np
import pytest

from experiments import value_cache, world
from jaxedit import testing
from jaxedit.editing import editor
from jaxedit.requests import EditRequest


@pytest.fixture(scope="module")
def tiny():
    cfg, params, tok = testing.tiny_model()
    hp = world.hparams_for("tiny-random", "memit")
    groups = (("{}",), ("The day . {}",))
    return cfg, params, tok, hp, groups


@pytest.fixture
def computed(monkeypatch):
    """The requests edit_values is asked to compute, call by call."""
    calls = []
    real = editor.edit_values

    def counting(params, cfg, tok, requests, hp, **kwargs):
        calls.append([r.target_new for r in requests])
        return real(params, cfg, tok, requests, hp, **kwargs)

    monkeypatch.setattr(editor, "edit_values", counting)
    return calls


def _request(case_id, target_new, subject="France"):
    return EditRequest(prompt="The capital of {} is", subject=subject, target_new=target_new, case_id=case_id)


def test_same_case_id_with_another_target_is_recomputed(tiny, tmp_path, computed):
    cfg, params, tok, hp, groups = tiny
    cache = value_cache.ValueCache(params, cfg, tok, tmp_path)
    paris = cache.get([_request(7, "Paris")], hp, groups)
    assert computed == [["Paris"]]
    again = value_cache.ValueCache(params, cfg, tok, tmp_path).get([_request(7, "Paris")], hp, groups)
    assert computed == [["Paris"]]  # served from disk
    np.testing.assert_array_equal(np.asarray(again.target), np.asarray(paris.target))
    rome = value_cache.ValueCache(params, cfg, tok, tmp_path).get([_request(7, "Rome")], hp, groups)
    assert computed == [["Paris"], ["Rome"]], "a value of another target was served for the same case id"
    assert not np.allclose(np.asarray(rome.target), np.asarray(paris.target))
    # both stay stored
    paris_again = value_cache.ValueCache(params, cfg, tok, tmp_path).get([_request(7, "Paris")], hp, groups)
    assert len(computed) == 2
    np.testing.assert_array_equal(np.asarray(paris_again.target), np.asarray(paris.target))


def test_case_ids_that_sanitise_alike_get_their_own_files(tiny, tmp_path, computed):
    cfg, params, tok, hp, groups = tiny
    slash, underscore = _request("a/b", "Paris"), _request("a_b", "Rome", subject="Italy")
    both = value_cache.ValueCache(params, cfg, tok, tmp_path).get([slash, underscore], hp, groups)
    assert len(list(tmp_path.glob("values/*/*.npz"))) == 2
    alone = value_cache.ValueCache(params, cfg, tok, tmp_path).get([slash], hp, groups)
    assert len(computed) == 1
    np.testing.assert_array_equal(np.asarray(alone.target[0]), np.asarray(both.target[0]))
    assert not np.allclose(np.asarray(alone.target[0]), np.asarray(both.target[1]))


def test_chunks_are_stored_as_they_finish(tiny, tmp_path, computed):
    """A failure in a later chunk (here a target too long for the model) keeps the earlier chunks'
    values on disk, so a rerun computes only what is still missing."""
    cfg, params, tok, hp, groups = tiny
    done = [_request(1, "Paris"), _request(2, "Rome", subject="Italy")]
    too_long = _request(3, " ".join(["city"] * (cfg.max_position_embeddings + 1)), subject="Spain")
    with pytest.raises(ValueError, match="longer than the model"):
        value_cache.ValueCache(params, cfg, tok, tmp_path).get(done + [too_long], hp, groups, chunk_size=2)
    assert len(computed) == 2 and computed[0] == ["Paris", "Rome"]
    assert len(list(tmp_path.glob("values/*/*.npz"))) == 2
    value_cache.ValueCache(params, cfg, tok, tmp_path).get(done, hp, groups, chunk_size=2)
    assert len(computed) == 2  # both served from disk
