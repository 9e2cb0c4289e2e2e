"""The preservation covariance: one pass for several layers, and the disk cache."""
import logging
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import packing
from jaxedit.editing import covariance as cov
from jaxedit.data import corpus
from jaxedit.editing import covariance_cache
from jaxedit.hparams import CovarianceHparams
from llama3_flax import config, model
from jaxedit.testing import CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=4)
    return cfg, model.init_params(cfg, jax.random.PRNGKey(0))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ----------------------------------------------------------------------- the pass
def test_covariance_pass_matches_captured_keys(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(3, 16)).astype(np.int32)
    mask = np.ones((3, 16), np.int32)
    mask[1, 9:] = 0
    mask[2, :] = 0  # a row of only padding (as in the last batch of a corpus)
    tokens[mask == 0] = 0
    layers = jnp.asarray([3, 1])
    sums, count = cov.covariance_pass(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), layers)
    assert sums.shape == (2, cfg.intermediate_size, cfg.intermediate_size) and sums.dtype == jnp.float32
    assert int(count) == 16 + 9

    positions = jnp.asarray(np.broadcast_to(np.arange(16), (3, 16)))
    _, captured = model.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                capture=model.Capture(layers=layers, positions=positions))
    for j in range(2):
        keys = np.asarray(captured.mlp_in[j], np.float64)[mask.astype(bool)]  # (25, F), pads excluded
        assert rel(sums[j], keys.T @ keys) <= 1e-5


def test_layers_are_data_one_compilation(tiny):
    cfg, params = tiny
    tokens = jnp.ones((2, 8), jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32)
    cov.covariance_pass(params, cfg, tokens, mask, jnp.asarray([0, 2]))
    size = cov.covariance_pass._cache_size()
    a, _ = cov.covariance_pass(params, cfg, tokens, mask, jnp.asarray([1, 3]))
    b, _ = cov.covariance_pass(params, cfg, tokens, mask, jnp.asarray([3, 0]))
    assert cov.covariance_pass._cache_size() == size
    np.testing.assert_array_equal(a[1], b[0])  # layer 3 both times


# ------------------------------------------------------------------------ corpora


def test_missing_corpus_errors_are_clear(tiny, tmp_path, monkeypatch):
    cfg, params = tiny
    with pytest.raises(FileNotFoundError, match="nope/corpus.txt.*does not exist"):
        cov.preservation_covariance(params, cfg, CharTokenizer(), [1], CovarianceHparams(
            corpus=str(tmp_path / "nope" / "corpus.txt"), n_samples=2, max_length=16, batch_size=2))
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in (datasets.config, huggingface_hub.constants):
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, True)
    with pytest.raises(RuntimeError, match="could not load the Hugging Face dataset 'jaxedit-no-such-corpus'.*local text file"):
        cov.preservation_covariance(params, cfg, CharTokenizer(), [1], CovarianceHparams(
            corpus="jaxedit-no-such-corpus:v1", n_samples=2, max_length=16, batch_size=2), progress=False)


# -------------------------------------------------------------------------- cache
def _run(tiny, corpus_file, cache_dir, layers=(1, 3), **kw):
    cfg, params = kw.pop("model", tiny)
    spec = CovarianceHparams(corpus=str(corpus_file), n_samples=8, max_length=24, batch_size=3)
    return cov.preservation_covariance(params, cfg, CharTokenizer(), list(layers), spec, cache_dir=cache_dir,
                                       progress=False, **kw)


def test_preservation_covariance_is_the_mean_of_captured_outer_products(tiny, corpus_file):
    cfg, params = tiny
    tok = CharTokenizer()
    got = _run(tiny, corpus_file, None, layers=(2,))
    samples = corpus.corpus_samples(tok, corpus.read_text_corpus(corpus_file), 8, 24)
    tokens, mask = (jnp.asarray(x) for x in cov.tokenize.pad_right(samples, 0, width=24))
    positions = jnp.asarray(np.broadcast_to(np.arange(24), tokens.shape))
    _, captured = model.forward(params, cfg, tokens, mask, capture=model.Capture(jnp.asarray([2]), positions))
    keys = np.asarray(captured.mlp_in[0], np.float64)[np.asarray(mask, bool)]
    assert list(got) == [2]
    assert rel(got[2], keys.T @ keys / len(keys)) <= 1e-5


def test_cache_round_trip(tiny, corpus_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _run(tiny, corpus_file, cache)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))
    with caplog.at_level(logging.INFO, logger="jaxedit.editing.covariance"):
        second = _run(tiny, corpus_file, cache)
    assert caplog.text.count("loaded from") == 2 and "rebuilding" not in caplog.text
    for layer in (1, 3):
        np.testing.assert_array_equal(first[layer], second[layer])
    # a subset of layers is served from the same files; another model is not
    assert len(_run(tiny, corpus_file, cache, layers=(3,))) == 1 and len(list(cache.glob("*.npz"))) == 2
    cfg, params = tiny
    edited = jax.tree.map(lambda x: x, params)
    edited["layers"]["down_proj"] = params["layers"]["down_proj"].at[2].add(1e-3)
    assert cov.model_fingerprint(edited, cfg) != cov.model_fingerprint(params, cfg)
    _run(tiny, corpus_file, cache, layers=(3,), model=(cfg, edited))
    assert len(list(cache.glob("*.npz"))) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(tiny, corpus_file, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first = _run(tiny, corpus_file, cache, layers=(1,))
    (path,) = cache.glob("*.npz")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        with zipfile.ZipFile(path) as z:  # flip bits inside the stored matrix
            info = z.getinfo("matrix.npy")
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 4096
        data[at] ^= 0x40
        data[at + 1] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a zip file at all")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="jaxedit.editing.covariance"):
        again = _run(tiny, corpus_file, cache, layers=(1,))
    assert "rebuilding" in caplog.text and str(path) in caplog.text
    np.testing.assert_allclose(again[1], first[1], rtol=1e-6, atol=1e-9)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxedit.editing.covariance"):
        _run(tiny, corpus_file, cache, layers=(1,))  # the rebuilt file is fine
    assert "rebuilding" not in caplog.text


def test_checksum_and_provenance_mismatch_are_rebuilt(tiny, corpus_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _run(tiny, corpus_file, cache, layers=(1,))
    (path,) = cache.glob("*.npz")
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    prov = stored["provenance"]
    # 1. a consistent file for another setting (valid checksum, other provenance)
    import json
    other = json.loads(str(prov))
    other["n_samples"] = 999
    covariance_cache.write_cache(path, stored["matrix"], int(stored["count"]), other)
    with caplog.at_level(logging.WARNING, logger="jaxedit.editing.covariance"):
        again = _run(tiny, corpus_file, cache, layers=(1,))
    assert "provenance differs in n_samples: 999 != 8" in caplog.text
    np.testing.assert_array_equal(again[1], first[1])
    # 2. a matrix changed after the checksum was written (zip CRCs recomputed, so only sha256 tells)
    caplog.clear()
    tampered = stored["matrix"].copy()
    tampered[0, 0] += 1.0
    np.savez(path, matrix=tampered, count=stored["count"], provenance=prov, sha256=stored["sha256"])
    with caplog.at_level(logging.WARNING, logger="jaxedit.editing.covariance"):
        again = _run(tiny, corpus_file, cache, layers=(1,))
    assert "sha256 checksum" in caplog.text
    np.testing.assert_array_equal(again[1], first[1])


def test_bad_layers_raise(tiny, corpus_file):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"layers \[4\]"):
        cov.preservation_covariance(params, cfg, CharTokenizer(), 4, CovarianceHparams(
            corpus=str(corpus_file), n_samples=2, max_length=16))


# ----------------------------------------------------------------------- SmolLM2
def test_smollm2_covariance_is_symmetric_psd(smollm2, data_dir):
    cfg, params, tokenizer = smollm2
    out = cov.preservation_covariance(params, cfg, tokenizer, [3, 17], CovarianceHparams(
        corpus="wikitext-2-raw-test.txt", n_samples=8, max_length=64, batch_size=8), data_dir=data_dir, progress=False)
    f = cfg.intermediate_size
    for layer in (3, 17):
        c0 = np.asarray(out[layer], np.float64)
        assert c0.shape == (f, f)
        np.testing.assert_array_equal(c0, c0.T)
        eig = np.linalg.eigvalsh(c0)
        assert eig.min() >= -1e-6 * eig.max()
        assert np.all(np.diag(c0) >= 0) and np.trace(c0) > 0


def test_all_layers_pass_equals_one_layer_passes(tiny, corpus_file):
    cfg, params = tiny
    every = list(range(cfg.num_hidden_layers))
    together = _run(tiny, corpus_file, None, layers=every)
    for layer in every:
        alone = _run(tiny, corpus_file, None, layers=(layer,))
        assert rel(together[layer], alone[layer]) <= 1e-6


def test_samples_are_packed_into_rows_once_each():
    lengths = [24, 3, 10, 24, 7, 14, 1, 20]
    rows = packing.first_fit_decreasing(lengths, 24)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 24 for row in rows)
    assert len(rows) == -(-sum(lengths) // 24)  # these lengths pack without a spare row
    samples = [[5] * n for n in lengths]
    assert cov.padding_share(samples, batch_size=2, max_length=24, pad_multiple=8) == pytest.approx(
        1 - sum(lengths) / (3 * 2 * 24))  # 5 rows in 3 batches of 2


def test_identity_spec_gives_the_identity_without_reading_a_corpus(tiny):
    cfg, params = tiny
    spec = CovarianceHparams(corpus="no-such-corpus-file.txt", identity=True)  # EasyEdit ROME's mom2_adjustment: false
    out = cov.preservation_covariance(params, cfg, CharTokenizer(), [2, 0], spec)
    assert sorted(out) == [0, 2]
    for c in out.values():
        np.testing.assert_array_equal(np.asarray(c), np.eye(cfg.intermediate_size, dtype=np.float32))
