"""EasyEdit's published hparams files for Llama-3-8B, Qwen2.5-7B and Mistral-7B (fixtures holding their
values), read through jaxedit.interop, and the qwen2.5-7b / mistral-7b presets made from them."""
import logging
from pathlib import Path

import pytest

from jaxedit import hparams
from jaxedit.interop import hparams_files
from llama3_flax.config import LlamaConfig, llama3_8b

FIXTURES = Path(__file__).parent / "fixtures" / "easyedit"
METHODS = {"MEMIT": "memit", "ROME": "rome", "EMMET": "emmet", "AlphaEdit": "alphaedit"}
# the models' shapes, as their HF config.json files give them
CONFIGS = {
    "llama3-8b": llama3_8b(),
    "qwen2.5-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                              max_position_embeddings=32768),
    "mistral-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, rope_theta=1e4,
                              max_position_embeddings=32768),
}
MEMIT_VALUE = dict(v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625)
AUTHORS_ALPHAEDIT_VALUE = dict(v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75,
                               kl_factor=0.0625)
# What each file says (written out here, not read from the files): layers, value settings, and the solve
EXPECTED = {
    "MEMIT": dict(layers=(4, 5, 6, 7, 8), value=MEMIT_VALUE, mom2_update_weight=15000.0),
    "ROME": dict(layers=(5,), value=MEMIT_VALUE, identity=True, groups=((5, 10), (10, 10))),
    "EMMET": dict(layers=(5,), value=MEMIT_VALUE, mom2_update_weight=100000.0, emmet_lambda=0.1),
    "AlphaEdit": dict(layers=(4, 5, 6, 7, 8), nullspace_threshold=2e-2, l2=1.0),
}
ALPHAEDIT_VALUE = {"llama3-8b": AUTHORS_ALPHAEDIT_VALUE, "qwen2.5-7b": MEMIT_VALUE, "mistral-7b": AUTHORS_ALPHAEDIT_VALUE}
CASES = [(folder, model) for folder in METHODS for model in CONFIGS]


@pytest.mark.parametrize("folder, model", CASES)
def test_each_fixture_reads_with_the_values_of_easyedits_file(folder, model):
    imported = hparams_files.import_hparams(FIXTURES / folder / f"{model}.yaml", cfg=CONFIGS[model])
    hp, want = imported.hparams, EXPECTED[folder]
    assert imported.format == "easyedit-yaml" and hp.method == METHODS[folder]
    assert hp.layers == want["layers"]
    value = ALPHAEDIT_VALUE[model] if folder == "AlphaEdit" else want["value"]
    assert {k: getattr(hp.value, k) for k in value} == pytest.approx(value)
    assert hp.value.v_loss_layer == -1            # each file's v_loss_layer is the model's last layer
    assert hp.covariance.identity is want.get("identity", False)
    assert (hp.covariance.corpus, hp.covariance.n_samples) == ("wikipedia:20220301.en", 100000)
    for name in ("mom2_update_weight", "emmet_lambda", "nullspace_threshold", "l2"):
        if name in want:
            assert getattr(hp, name) == pytest.approx(want[name]), name
    if "groups" in want:
        assert hp.templates.groups == want["groups"]


def _carried(hp):
    """The settings an EasyEdit file carries for hp's method."""
    spec = hp.spec
    return (hp.method, hp.layers, hp.value.v_num_grad_steps, hp.value.v_lr, hp.value.v_weight_decay,
            hp.value.clamp_norm_factor, hp.value.kl_factor, hp.value.v_loss_layer, hp.covariance.corpus,
            hp.covariance.n_samples, hp.covariance.identity,
            hp.mom2_update_weight if spec.uses_preservation_weight else None,
            hp.emmet_lambda if spec.uses_emmet_lambda else None,
            (hp.nullspace_threshold, hp.l2) if spec.uses_null_space else None,
            hp.templates.groups if hp.method == "rome" else None)


@pytest.mark.parametrize("folder, model", [c for c in CASES if c[1] != "llama3-8b"])
def test_qwen_and_mistral_presets_are_what_the_files_say(folder, model):
    method = METHODS[folder]
    preset = hparams.preset(model, method)
    path = FIXTURES / folder / f"{model}.yaml"
    # from a base far from the preset (SmolLM2's), the file's own fields land on the preset's values
    read = hparams_files.read_hparams(path, cfg=CONFIGS[model], base=hparams.preset("smollm2-135m", method))
    assert _carried(read) == _carried(preset)
    # and with the preset as base, nothing else differs either
    assert hparams_files.read_hparams(path, cfg=CONFIGS[model], base=preset) == preset


@pytest.mark.parametrize("model", ["qwen2.5-7b", "mistral-7b"])
def test_preset_for_recognises_qwen_and_mistral(caplog, model):
    with caplog.at_level(logging.WARNING, logger="jaxedit.hparams"):
        for method in METHODS.values():
            assert hparams.preset_for(CONFIGS[model], method) == hparams.preset(model, method)
    assert not caplog.records


def test_mistral_and_llama3_8b_share_widths_and_are_told_apart_by_vocabulary():
    assert hparams.preset_name_for(CONFIGS["mistral-7b"]) == "mistral-7b"
    assert hparams.preset_name_for(CONFIGS["mistral-7b"].replace(vocab_size=32768)) == "mistral-7b"  # v0.3
    assert hparams.preset_name_for(CONFIGS["llama3-8b"]) == "llama3-8b"
    assert hparams.preset("mistral-7b", "memit") != hparams.preset("llama3-8b", "memit")


def test_alphaedit_refuses_an_identity_c0():
    with pytest.raises(ValueError, match="AlphaEdit needs C0's null space"):
        hparams.preset("qwen2.5-7b", "alphaedit").replace(
            covariance=hparams.CovarianceHparams(identity=True))
