"""The Method descriptions: what each method takes, and the ridge of its solve."""
import pytest

from jaxedit import methods
from jaxedit.hparams import EditHparams, preset


def test_methods_by_name():
    assert methods.method("MEMIT") is methods.MEMIT and methods.method(methods.ROME) is methods.ROME
    assert sorted(methods.METHODS) == ["alphaedit", "emmet", "memit", "rome"]
    with pytest.raises(ValueError, match="unknown editing method 'ft'"):
        methods.method("ft")


def test_sites_templates_and_limits():
    assert (methods.ROME.site, methods.MEMIT.site, methods.EMMET.site) == ("mlp", "resid", "resid")
    assert not methods.ROME.grouped_templates and methods.MEMIT.grouped_templates
    assert methods.ROME.max_requests == 1 and methods.MEMIT.max_requests is None
    assert methods.ROME.max_layers == 1 and methods.MEMIT.max_layers is None is methods.EMMET.max_layers
    methods.MEMIT.check_requests(1000)
    with pytest.raises(ValueError, match="ROME edits one fact at a time"):
        methods.ROME.check_requests(2)
    with pytest.raises(ValueError, match="rome edits one layer"):
        methods.ROME.check_layers((1, 2))


def test_ridge_rules():
    assert methods.ROME.ridge(15000.0, 0.1, 1) == 0.0
    assert methods.MEMIT.ridge(100.0, 0.1, 1) == 100.0 == methods.MEMIT.ridge(100.0, 0.1, 64)
    assert methods.EMMET.ridge(15000.0, 0.1, 1) == 0.0  # equality constraints for one edit
    assert methods.EMMET.ridge(15000.0, 0.1, 2) == pytest.approx(1500.0)
    assert not methods.ROME.uses_preservation_weight and methods.EMMET.uses_emmet_lambda
    # AlphaEdit: the null-space update, which takes no lambda, and keeps earlier keys in sequence
    assert methods.ALPHAEDIT.uses_null_space and not methods.ALPHAEDIT.uses_preservation_weight
    assert methods.ALPHAEDIT.keeps_previous_keys and not methods.MEMIT.keeps_previous_keys
    assert not any(m.uses_null_space for m in (methods.ROME, methods.MEMIT, methods.EMMET))


def test_hparams_know_their_method():
    for name in ("rome", "memit", "emmet", "alphaedit"):
        hp = preset("smollm2-135m", name)
        assert hp.spec is methods.method(name)
        assert hp.templates.groups == hp.spec.template_groups
    assert EditHparams(method="MEMIT", layers=(1,)).method == "memit"
