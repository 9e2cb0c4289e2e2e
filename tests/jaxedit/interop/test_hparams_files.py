"""The PyTorch tools' hparams files (EasyEdit YAML, reference-repository JSON), read and written."""
import json
import re

import pytest

from jaxedit import hparams
from jaxedit.interop import hparams_files
from llama3_flax import config

# Fixtures written in the tools' formats (field names as in zjunlp/EasyEdit hparams/*/*.yaml and the
# kmeng01/memit, unified-model-editing hparams/*/*.json; values chosen for these tests).
EASYEDIT_MEMIT = """\
alg_name: "MEMIT"
model_name: "./hugging_cache/Meta-Llama-3-8B-Instruct"
stats_dir: "./data/stats"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
batch_size: 16
max_length: 40
"""

EASYEDIT_ROME = """\
alg_name: "ROME"
model_name: "./hugging_cache/Llama-3-8B"
stats_dir: "./data/stats"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: true
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""

REFERENCE_EMMET = {
    "layers": [1], "clamp_norm_factor": 4, "layer_selection": "all", "fact_token": "subject_last",
    "v_num_grad_steps": 25, "v_lr": 5e-1, "v_loss_layer": 31, "v_weight_decay": 1e-3, "kl_factor": 0.0625,
    "mom2_adjustment": True, "mom2_update_weight": 10000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm", "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
    "calculate_objective_value": False, "update_norm_lambda": 0, "emmet_lambda": 0.2,
}

REFERENCE_ROME_GPTJ = {
    "layers": [5], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 27,
    "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
    "context_template_length_params": [[5, 10], [10, 10]], "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
    "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
}

LLAMA3_8B = config.llama3_8b()


def _write(tmp_path, folder, name, text):
    d = tmp_path / "hparams" / folder
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(text if isinstance(text, str) else json.dumps(text, indent=4))
    return p


# ------------------------------------------------------------------------------ readers
def test_easyedit_memit_yaml(tmp_path):
    path = _write(tmp_path, "MEMIT", "llama3-8b.yaml", EASYEDIT_MEMIT)
    info = hparams_files.import_hparams(path, cfg=LLAMA3_8B)
    hp = info.hparams
    assert hp.method == "memit" and hp.layers == (4, 5, 6, 7, 8)
    # "5e-1" and "1e-3" are strings for YAML 1.1; they must still be read as numbers
    assert hp.value == hparams.ValueHparams(v_num_grad_steps=25, v_lr=0.5, v_loss_layer=-1, v_weight_decay=1e-3,
                                            clamp_norm_factor=4.0, kl_factor=0.0625)
    assert hp.mom2_update_weight == 15000.0
    assert hp.covariance.n_samples == 100000 and hp.covariance.corpus == "wikipedia:20220301.en"
    assert hp.templates.groups == ((10, 5),)
    assert info.format == "easyedit-yaml" and info.model_name.endswith("Meta-Llama-3-8B-Instruct")
    assert info.batch_size == 16
    assert {"device", "stats_dir", "layer_module_tmp", "model_parallel", "max_length"} <= set(info.ignored)
    assert "covariance.max_length" in info.defaults
    assert hparams_files.read_hparams(path, cfg=LLAMA3_8B) == hp


def test_easyedit_rome_yaml_templates_and_ignored_weight(tmp_path):
    text = EASYEDIT_ROME + "mom2_update_weight: 15000\n"
    hp = hparams_files.read_hparams(_write(tmp_path, "ROME", "llama3-8b.yaml", text), cfg=LLAMA3_8B)
    assert hp.method == "rome" and hp.layers == (5,) and hp.value.v_num_grad_steps == 20
    assert hp.templates.groups == ((5, 10), (10, 10))
    info = hparams_files.import_hparams(_write(tmp_path, "ROME", "x.yaml", text), cfg=LLAMA3_8B)
    assert "mom2_update_weight" in info.ignored and "fp16" in info.ignored


def test_reference_json_method_from_folder(tmp_path):
    path = _write(tmp_path, "EMMET", "llama3-8b.json", REFERENCE_EMMET)
    info = hparams_files.import_hparams(path, cfg=LLAMA3_8B)
    hp = info.hparams
    assert info.format == "reference-json" and info.model_name is None
    assert hp.method == "emmet" and hp.layers == (1,)
    assert hp.emmet_lambda == 0.2 and hp.mom2_update_weight == 10000.0
    assert "calculate_objective_value" in info.ignored


def test_reference_json_needs_a_method_and_agreement(tmp_path):
    path = _write(tmp_path, "mine", "llama3-8b.json", REFERENCE_EMMET)
    with pytest.raises(ValueError, match="pass method="):
        hparams_files.read_hparams(path)
    assert hparams_files.read_hparams(path, method="memit", cfg=LLAMA3_8B).method == "memit"
    yaml_path = _write(tmp_path, "MEMIT", "m.yaml", EASYEDIT_MEMIT)
    with pytest.raises(ValueError, match="conflicting methods"):
        hparams_files.read_hparams(yaml_path, method="emmet")


def test_base_supplies_what_files_do_not_carry(tmp_path):
    base = hparams.preset("smollm2-135m", "memit")
    base = base.replace(covariance=hparams.CovarianceHparams(max_length=64, batch_size=4))
    path = _write(tmp_path, "MEMIT", "m.json", {**REFERENCE_EMMET, "layers": [3]})
    hp = hparams_files.read_hparams(path, num_layers=32, base=base)
    assert hp.covariance.max_length == 64 and hp.covariance.batch_size == 4
    assert hp.covariance.n_samples == 100000 and hp.layers == (3,)


def test_gptj_module_names_are_technical_but_loss_layer_is_checked(tmp_path):
    path = _write(tmp_path, "ROME", "gpt-j.json", REFERENCE_ROME_GPTJ)
    hp = hparams_files.read_hparams(path)  # no model given: v_loss_layer is kept for compute_values to check
    assert hp.method == "rome" and hp.value.v_loss_layer == 27 and hp.value.v_weight_decay == 0.5
    assert hparams_files.read_hparams(path, num_layers=28).value.v_loss_layer == -1
    with pytest.raises(hparams_files.UnsupportedHparams, match=r"v_loss_layer=27 \(only the last layer \(31\)"):
        hparams_files.read_hparams(path, cfg=LLAMA3_8B)


@pytest.mark.parametrize("change, field", [
    ({"fact_token": "last"}, "fact_token"),
    ({"fact_token": "subject_first"}, "fact_token"),
    ({"mom2_adjustment": False}, "mom2_adjustment"),
    ({"v_loss_layer": 20}, "v_loss_layer"),
    ({"update_norm_lambda": 10}, "update_norm_lambda"),
    ({"layer_selection": "random"}, "layer_selection"),
    ({"mom2_dtype": "float16"}, "mom2_dtype"),
    ({"rewrite_module_tmp": "model.layers.{}.mlp.up_proj"}, "rewrite_module_tmp"),
    ({"layers": [2, 1]}, "layers"),                       # not increasing
    ({"layers": [40]}, "layers"),                         # beyond the model
    ({"v_lr": "fast"}, "v_lr"),
    ({"sequential_edit": True}, "sequential_edit"),       # unknown field
    ({"alg_name": "FT"}, "FT"),
])
def test_unsupported_fields_are_named(tmp_path, change, field):
    data = {**REFERENCE_EMMET, **change}
    path = _write(tmp_path, "EMMET", "bad.json", data)
    with pytest.raises(hparams_files.UnsupportedHparams, match=re.escape(field)):
        hparams_files.read_hparams(path, cfg=LLAMA3_8B)


def test_all_problems_reported_at_once(tmp_path):
    data = {**REFERENCE_EMMET, "fact_token": "last", "update_norm_lambda": 1, "frobnicate": 3}
    with pytest.raises(hparams_files.UnsupportedHparams) as e:
        hparams_files.hparams_from_dict(data, method="emmet", cfg=LLAMA3_8B)
    for f in ("fact_token", "update_norm_lambda", "frobnicate"):
        assert f in str(e.value)


def test_rome_without_covariance_reads_as_identity_and_writes_back(tmp_path):
    text = EASYEDIT_ROME.replace("mom2_adjustment: true", "mom2_adjustment: false")
    hp = hparams_files.read_hparams(_write(tmp_path, "ROME", "r.yaml", text), cfg=LLAMA3_8B)
    assert hp.covariance.identity
    assert not hparams_files.read_hparams(_write(tmp_path, "ROME", "c.yaml", EASYEDIT_ROME), cfg=LLAMA3_8B).covariance.identity
    assert hparams_files.hparams_to_dict(hp, LLAMA3_8B)["mom2_adjustment"] is False
    with pytest.raises(hparams_files.UnsupportedHparams, match="only the tools' ROME"):
        hparams_files.hparams_to_dict(hp.replace(method="memit", templates=hparams.reference_templates("memit")),
                                      LLAMA3_8B)


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_write_then_read_round_trip(tmp_path, method, suffix):
    cfg = config.smollm2_135m()
    hp = hparams.preset("smollm2-135m", method)
    path = hparams_files.write_hparams(tmp_path / method / f"smollm2{suffix}", hp, cfg, model_name="HuggingFaceTB/SmolLM2-135M")
    back = hparams_files.read_hparams(path, method=method, cfg=cfg, base=hp.replace(covariance=hparams.CovarianceHparams()))
    assert back.replace(covariance=hp.covariance) == hp
    assert back.covariance.n_samples == hp.covariance.n_samples and back.covariance.corpus == hp.covariance.corpus


# AlphaEdit: EasyEdit's hparams/AlphaEdit/*.yaml carries alg_name and P_loc (where a precomputed
# projector lives); the authors' hparams/AlphaEdit/*.json does not. Both carry nullspace_threshold, L2.
ALPHAEDIT_FIELDS = """\
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 1e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 10
"""


@pytest.mark.parametrize("fmt", ["easyedit", "reference"])
def test_alphaedit_files(tmp_path, fmt):
    if fmt == "easyedit":
        text = 'alg_name: "AlphaEdit"\nP_loc: "./null_space_project.pt"\ndevice: 0\n' + ALPHAEDIT_FIELDS
        path = _write(tmp_path, "AlphaEdit", "llama3-8b.yaml", text)
    else:
        import yaml
        path = _write(tmp_path, "AlphaEdit", "Llama3-8B.json", json.dumps(yaml.safe_load(ALPHAEDIT_FIELDS)))
    info = hparams_files.import_hparams(path, cfg=LLAMA3_8B)
    hp = info.hparams
    assert hp.method == "alphaedit" and hp.layers == (4, 5, 6, 7, 8)
    assert hp.nullspace_threshold == 0.02 and hp.l2 == 10.0
    assert hp.value.v_lr == 0.1 and hp.value.v_weight_decay == 0.5 and hp.value.clamp_norm_factor == 0.75
    assert "mom2_update_weight" in info.ignored  # the null-space update does not use lambda
    assert hp == hparams.preset("llama3-8b", "alphaedit").replace(covariance=hp.covariance)
    if fmt == "easyedit":
        assert "P_loc" in info.ignored
    with pytest.raises(hparams_files.UnsupportedHparams, match="L2=-1"):
        hparams_files.read_hparams(_write(tmp_path, "AlphaEdit", "bad.json",
                                          json.dumps({**yaml_dict(ALPHAEDIT_FIELDS), "L2": -1})), cfg=LLAMA3_8B)


def yaml_dict(text):
    import yaml
    return yaml.safe_load(text)
