"""The sweeps' hparams come from the model they run on (jaxedit.hparams.preset_for), not from SmolLM2's."""
import logging

import pytest

from experiments import world
from jaxedit import hparams
from llama3_flax import config


def test_a_sweep_of_llama3_8b_runs_with_the_papers_preset():
    hp = world.hparams_for("/models/Meta-Llama-3-8B", "memit", cfg=config.llama3_8b())
    assert hp == hparams.preset("llama3-8b", "memit")
    assert hp.layers == (1,) and hp.mom2_update_weight == 15000.0   # not SmolLM2's layer 3 and lambda 100


def test_a_sweep_of_an_unknown_model_warns_naming_the_borrowed_preset(caplog):
    with caplog.at_level(logging.WARNING):
        hp = world.hparams_for("/models/Llama-3-70B", "emmet", layer=7, cfg=config.llama3_70b())
    assert hp == hparams.preset(hparams.BORROWED_PRESET, "emmet").replace(layers=(7,))
    assert any(f"borrows the {hparams.BORROWED_PRESET!r} preset" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_a_sweep_needs_the_models_config_to_choose_its_preset():
    with pytest.raises(ValueError, match="needs cfg="):
        world.hparams_for("/models/Meta-Llama-3-8B", "memit")


def test_tiny_random_borrows_smollm2s_preset_shrunk_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        hp = world.hparams_for("tiny-random", "memit")
    assert hp.mom2_update_weight == hparams.preset("smollm2-135m", "memit").mom2_update_weight
    assert hp.layers == (1,) and hp.value.v_num_grad_steps == 4
    assert any("tiny-random borrows SmolLM2-135M's memit preset" in r.getMessage() for r in caplog.records)
