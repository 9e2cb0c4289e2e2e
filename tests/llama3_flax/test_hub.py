"""Hub ids resolved through a Hugging Face cache built in a temporary HF_HOME, offline."""
import jax
import numpy as np
import pytest

from llama3_flax import checkpoint, config, hub, model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(home, repo_id, files_from):
    """huggingface_hub's cache layout: hub/models--OWNER--NAME/{refs/main, snapshots/<commit>/...}."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def tiny_folder(smollm2, tmp_path_factory):
    """(cfg, params, HF folder with weights and SmolLM2's tokenizer)."""
    _, _, tok = smollm2
    cfg = config.tiny(vocab_size=len(tok))
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    folder = checkpoint.save_hf_folder(tmp_path_factory.mktemp("tiny"), params, cfg, tokenizer=tok)
    return cfg, params, folder


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_is_hub_id(tmp_path, monkeypatch):
    for repo in ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Meta-Llama-3-8B", "a/b.c_d-e"):
        assert hub.is_hub_id(repo), repo
    for other in ("smollm2", "a/b/c", "/abs/path", "./x", "../x/y", "dir/model.gguf", "owner/", "/name"):
        assert not hub.is_hub_id(other), other
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "local").mkdir(parents=True)
    assert not hub.is_hub_id("someone/local")  # an existing path is a path


def test_env_is_read_at_call_time():
    assert hub.is_offline({"HF_HUB_OFFLINE": "1"}) and hub.is_offline({"TRANSFORMERS_OFFLINE": "yes"})
    assert not hub.is_offline({"HF_HUB_OFFLINE": "0"}) and not hub.is_offline({})
    assert str(hub.hub_cache_dir({"HF_HOME": "/x/hf"})) == "/x/hf/hub"
    assert str(hub.hub_cache_dir({"HF_HOME": "/x/hf", "HF_HUB_CACHE": "/y/c"})) == "/y/c"


def test_offline_cache_lookup_finds_snapshot(offline_home, tiny_folder):
    _, _, folder = tiny_folder
    snapshot = _hub_cache(offline_home, "someone/tiny-llama", folder)
    assert hub.resolve_model("someone/tiny-llama") == snapshot


def test_load_model_resolves_hub_id_offline(offline_home, tiny_folder, smollm2):
    cfg, params, folder = tiny_folder
    _hub_cache(offline_home, "someone/tiny-llama", folder)
    cfg2, params2, tok = checkpoint.load_model("someone/tiny-llama")
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "The capital of France is 12 <|im_start|>"
    assert tok(text)["input_ids"] == smollm2[2](text)["input_ids"]


def test_missing_model_offline_says_what_to_do(offline_home):
    with pytest.raises(hub.HubModelError) as err:
        checkpoint.load_model("someone/not-there")
    msg = str(err.value)
    for part in ("someone/not-there", "HF_HUB_OFFLINE", "HF_HUB_OFFLINE=0", "huggingface-cli download someone/not-there",
                 ".gguf", str(offline_home / "hub")):
        assert part in msg, part


def test_snapshot_without_weights_is_named(offline_home, tiny_folder, tmp_path):
    _, _, folder = tiny_folder
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((folder / "config.json").read_bytes())
    _hub_cache(offline_home, "someone/partial", partial)
    with pytest.raises(hub.HubModelError, match=r"has no \*\.safetensors weights"):
        hub.resolve_model("someone/partial")


def test_local_owner_name_folder_is_not_looked_up(offline_home, tiny_folder, tmp_path, monkeypatch):
    cfg, _, folder = tiny_folder
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "someone" / "tiny-llama"
    local.mkdir(parents=True)
    for f in folder.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    # the cache in offline_home is empty, so only the local folder can satisfy this
    assert checkpoint.load_model("someone/tiny-llama")[0] == cfg
