"""preset_for: the preset of a model recognised from its config's shape, or a borrowed one, named."""
import logging

import pytest

from jaxedit import hparams
from llama3_flax import config


@pytest.mark.parametrize("make, name", [(config.smollm2_135m, "smollm2-135m"), (config.llama3_8b, "llama3-8b"),
                                        (config.llama3_2_1b, "llama3.2-1b")])
@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
def test_known_models_get_their_own_preset_without_warning(caplog, make, name, method):
    with caplog.at_level(logging.WARNING, logger="jaxedit.hparams"):
        hp = hparams.preset_for(make(), method)
    assert hparams.preset_name_for(make()) == name
    assert hp == hparams.preset(name, method)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_llama3_8b_gets_the_papers_preset_not_smollm2s():
    hp = hparams.preset_for(config.llama3_8b(), "memit")
    assert hp.layers == (1,) and hp.mom2_update_weight == 15000.0      # Yoon et al.: layer 1, lambda 15000
    smollm2 = hparams.preset("smollm2-135m", "memit")
    assert (smollm2.layers, smollm2.mom2_update_weight) == ((3,), 100.0)
    assert hp != smollm2


def test_shape_not_widths_alone_names_the_model():
    # Llama-3-8B's widths with another vocabulary (and Llama-3-70B) are not Llama-3-8B
    assert hparams.preset_name_for(config.llama3_8b().replace(vocab_size=32001)) is None
    assert hparams.preset_name_for(config.llama3_70b()) is None
    assert hparams.preset_name_for(config.smollm2_135m().replace(num_hidden_layers=6)) is None


def test_an_unknown_model_borrows_a_preset_and_the_warning_names_it(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxedit.hparams"):
        hp = hparams.preset_for(config.llama3_70b(), "memit")
    assert hp == hparams.preset(hparams.BORROWED_PRESET, "memit")
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"borrows the {hparams.BORROWED_PRESET!r} preset (layers [1])" in record.getMessage()
    assert "hidden_size=8192" in record.getMessage()


def test_unknown_preset_names_are_refused():
    with pytest.raises(ValueError, match="no hparams preset for model 'gpt2'"):
        hparams.preset("gpt2", "memit")
