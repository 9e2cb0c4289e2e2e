"""Checkpoints the PyTorch tools edited (HF folders), compared with the original and with our own edit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxedit.editing import editor
from jaxedit.interop import checkpoints
from jaxedit.requests import EditRequest
from llama3_flax import checkpoint, config, model
from jaxedit.testing import CharTokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = config.tiny(num_hidden_layers=3)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    folder = checkpoint.save_hf_folder(tmp_path_factory.mktemp("orig"), params, cfg)
    return cfg, params, folder


def _torch_edit(folder, out, layer, dtype, scale=0.05):
    """Loads the folder in transformers, adds a rank-one change to one down_proj, saves it."""
    import torch
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    w = m.model.layers[layer].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
    delta = scale * u @ v
    with torch.no_grad():
        w += delta
    m.to(getattr(torch, dtype)).save_pretrained(str(out))
    return delta.numpy()


def test_compare_torch_edited_checkpoint(tiny_folder, tmp_path):
    cfg, params, folder = tiny_folder
    delta = _torch_edit(folder, tmp_path / "edited", 1, "float32")
    ours = editor.add_to_down_proj(params, 1, jnp.asarray(delta * 1.01))
    req = EditRequest(prompt="{} lives in", subject="Ada", target_new="Rome", target_true="Paris",
                      paraphrase_prompts=("Where Ada lives:",), neighborhood_prompts=("Bob lives in",))
    c = checkpoints.compare_checkpoint(params, cfg, tmp_path / "edited", ours=ours, tokenizer=CharTokenizer(),
                                   requests=[req])
    assert c.storage_dtype == "float32" and c.changed_layers == (1,)
    assert [(ch.key, ch.layer) for ch in c.changes] == [("layers.down_proj", 1)]
    w = np.asarray(params["layers"]["down_proj"][1], np.float64)
    assert c.changes[0].name == "model.layers.1.mlp.down_proj.weight"
    assert c.changes[0].relative == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=1e-5)
    (a,) = c.agreement
    assert a.delta_difference == pytest.approx(0.01, rel=1e-3) and a.cosine == pytest.approx(1.0, abs=1e-6)
    assert set(c.metrics) == {"original", "theirs", "ours"} and c.metrics["theirs"].n_cases == 1
    text = c.format()
    assert "model.layers.1.mlp.down_proj.weight" in text and "theirs" in text


def test_bfloat16_export_is_compared_at_its_precision(tiny_folder, tmp_path):
    cfg, params, folder = tiny_folder
    _torch_edit(folder, tmp_path / "zero", 2, "bfloat16", scale=0.0)  # an unedited bfloat16 export
    c = checkpoints.compare_checkpoint(params, cfg, tmp_path / "zero")
    assert c.storage_dtype == "bfloat16" and c.changes == ()
    delta = _torch_edit(folder, tmp_path / "bf16", 2, "bfloat16", scale=0.5)
    c = checkpoints.compare_checkpoint(params, cfg, tmp_path / "bf16")
    assert c.changed_layers == (2,) and c.changes[0].key == "layers.down_proj"
    w = np.asarray(params["layers"]["down_proj"][2], np.float64)
    assert c.changes[0].relative == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=2e-2)


def test_other_model_is_rejected(tiny_folder, tmp_path):
    cfg, params, _ = tiny_folder
    other = config.tiny(num_hidden_layers=2)
    folder = checkpoint.save_hf_folder(tmp_path / "other", model.init_params(other, jax.random.PRNGKey(1)), other)
    with pytest.raises(checkpoint.CheckpointError, match="num_hidden_layers 3 .original. vs 2"):
        checkpoints.compare_checkpoint(params, cfg, folder)


def test_weight_changes_sees_any_tensor(tiny_folder):
    cfg, params, _ = tiny_folder
    edited = {**params, "layers": {**params["layers"],
                                   "q_proj": params["layers"]["q_proj"].at[0, 0, 0].add(1.0)}}
    (ch,) = checkpoints.weight_changes(params, edited)
    assert ch.name == "model.layers.0.self_attn.q_proj.weight" and ch.layer == 0
    assert checkpoints.weight_changes(params, edited, threshold=1.0) == ()
