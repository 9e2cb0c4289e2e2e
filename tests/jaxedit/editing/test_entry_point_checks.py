"""Inputs of the editing core that used to pass unchecked: C0 from samples longer than the model's
positions, a C0 far from symmetric, and a template cache file with an empty group."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import testing
from jaxedit.cache import model_fingerprint
from jaxedit.editing import covariance, editor, templates
from jaxedit.hparams import CovarianceHparams, EditHparams, TemplateHparams, ValueHparams
from jaxedit.requests import EditRequest

GROUPS = (("{}",), ("Once upon a time. {}", "Because of that, {}"))
REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", case_id=0)


@pytest.fixture(scope="module")
def tiny():
    """A tiny model (MLP width 96) and a well-conditioned SPD stand-in for its C0."""
    cfg, params, tok = testing.tiny_model(num_hidden_layers=2)
    a = np.random.default_rng(0).standard_normal((cfg.intermediate_size, 4 * cfg.intermediate_size))
    return cfg, params, tok, a @ a.T / a.shape[1] + 0.1 * np.eye(cfg.intermediate_size)


@pytest.fixture
def no_value_loop(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the value optimisation ran before the cheap checks")
    monkeypatch.setattr(editor, "compute_values", refuse)


def test_covariance_samples_longer_than_the_positions_are_refused(tiny, corpus_file):
    cfg, params, tok, _ = tiny  # max_position_embeddings 256
    spec = CovarianceHparams(corpus=str(corpus_file), n_samples=4, max_length=512, batch_size=2)
    with pytest.raises(ValueError, match=r"max_length 512 .* max_position_embeddings \(256\)"):
        covariance.preservation_covariance(params, cfg, tok, [0], spec, progress=False)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_covariance_far_from_symmetric_is_refused_before_the_values(tiny, no_value_loop, method):
    cfg, params, tok, c = tiny
    skew = np.triu(np.full_like(c, 0.18 * np.abs(c).max()), 1)
    lopsided = jnp.asarray(c + skew, jnp.float32)  # max |C - C^T| / max |C| = 0.18, as in the issue
    hp = EditHparams(method=method, layers=(1,), value=ValueHparams(v_num_grad_steps=2))
    with pytest.raises(ValueError, match=r"layer 1 is not symmetric \(max \|C - C\^T\| / max \|C\| = 0\.18"):
        editor.edit(params, cfg, tok, [REQUEST], hp, covariances={1: lopsided}, templates=GROUPS)


def test_a_covariance_symmetric_to_rounding_is_accepted(tiny):
    from jaxedit.editing import preflight

    cfg, _, _, c = tiny
    noise = 1e-7 * np.abs(c).max() * np.random.default_rng(0).standard_normal(c.shape)
    factors, _ = preflight.preservation_factors({1: jnp.asarray(c + noise, jnp.float32)}, [1], cfg.intermediate_size)
    assert bool(factors[1].factored)


def test_a_template_cache_file_with_a_bad_group_is_regenerated(tiny, tmp_path, caplog):
    cfg, params, tok, _ = tiny
    spec = TemplateHparams(groups=((3, 5),))
    good = templates.context_templates(params, cfg, tok, spec, cache_dir=tmp_path)
    (path,) = (tmp_path / "templates").glob("*.json")
    assert path.name.startswith(model_fingerprint(params, cfg))
    groups = [list(g) for g in good]
    for damage in (groups + [[]], groups[:1], [groups[0], groups[1][:2]]):  # an empty group, too few, too small
        caplog.clear()
        path.write_text(json.dumps(damage))
        assert templates.context_templates(params, cfg, tok, spec, cache_dir=tmp_path) == good
        assert "context template cache" in caplog.text and str(path) in caplog.text
