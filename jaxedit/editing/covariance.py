"""The preservation covariance C0 = E[k k^T] of down_proj inputs (keys) over a text corpus.

Axis vocabulary: B batch, T token slots, F MLP width (the key size), Lr requested layers.

`covariance_pass` runs the model once over a padded batch and accumulates sum_t k_t k_t^T over the
non-pad tokens for every requested layer (layers are data: any set of the same size reuses one
compilation). `preservation_covariance` streams a corpus through it and caches each layer's C0 on
disk with its provenance (model fingerprint, tokenizer, corpus, sample count, length) and a sha256
checksum; a corrupt or mismatched cache file is reported and rebuilt, never used.

Corpora and their token samples: jaxedit.data.corpus. The cache files: jaxedit.editing.covariance_cache.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from llama3_flax import model as llama
from llama3_flax.config import LlamaConfig

from jaxedit import packing
from jaxedit.cache import model_fingerprint, tokenizer_fingerprint
from jaxedit.data.corpus import CorpusSpec, corpus_samples
from jaxedit.editing import tokenize
from jaxedit.editing.covariance_cache import CACHE_FORMAT, cache_file, read_cache, write_cache
from jaxedit.hparams import CovarianceHparams

logger = logging.getLogger(__name__)

_LOCAL_SUFFIXES = (".txt", ".tokens", ".raw", ".text")


# ------------------------------------------------------------------------ one pass
@functools.partial(jax.jit, static_argnames=("cfg",))
def covariance_pass(params: llama.Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array,
                    layers: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of key outer products over the non-pad tokens of one batch, for several layers at once.

    One forward pass (a scan over the stacked layers); layers after the last requested one are
    skipped, and the outer product is computed only at requested layers (lax.cond).

    Args:
      params: model parameters (layers stacked on axis 0).
      cfg: the model config (static).
      tokens: (B, T) int token ids.
      mask: (B, T) 1 for real tokens, 0 for padding (rows of only padding are allowed).
      layers: (Lr,) int layer indices, distinct (data: another set of the same size does not recompile).
    Returns:
      (sums (Lr, F, F) float32 with sums[j] = sum over real tokens of k k^T at layers[j],
       count () int32, the number of real tokens).
    """
    layers = jnp.asarray(layers, jnp.int32)
    if layers.ndim != 1:
        raise ValueError(f"layers must be a 1-D array of layer indices, got shape {layers.shape}")
    f = cfg.intermediate_size
    cos, sin, bias = llama.layer_context(cfg, mask)
    valid = mask.astype(bool)[..., None]
    last = jnp.max(layers)
    zeros = jnp.zeros((f, f), jnp.float32)

    def outer(mlp_in):
        k = jnp.where(valid, mlp_in.astype(jnp.float32), 0.0).reshape(-1, f)
        return jnp.einsum("nf,ng->fg", k, k, precision=jax.lax.Precision.HIGHEST)

    def active(i, lp, carry):
        h, acc = carry
        hit = layers == i
        h, mlp_in, _ = llama.decoder_layer(cfg, lp, h, cos, sin, bias)
        kk = jax.lax.cond(jnp.any(hit), outer, lambda _: zeros, mlp_in)
        return (h, acc.at[jnp.argmax(hit)].add(kk)), ()  # adds zeros where no layer is requested

    acc0 = jnp.zeros((layers.shape[0], f, f), jnp.float32)
    h0 = llama.embed(params, tokens)
    (_, acc), _ = llama.scan_layers(params, cfg, (h0, acc0), active, lambda i, c: (c, ()), last_layer=last)
    return acc, jnp.sum(mask.astype(jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(total: jax.Array, sums: jax.Array) -> jax.Array:
    return total + sums


# ------------------------------------------------------------------------ driver
def _batches(samples: list[list[int]], batch_size: int, pad_id: int, max_length: int, pad_multiple: int):
    """Fixed-shape padded batches (B = batch_size; widths bucketed), longest samples first."""
    order = sorted(samples, key=len, reverse=True)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = min(packing.bucket(len(chunk[0]), pad_multiple), max_length)
        chunk = chunk + [[]] * (batch_size - len(chunk))  # padding rows (mask 0)
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for j, s in enumerate(chunk):
            tokens[j, :len(s)] = s
            mask[j, :len(s)] = 1
        yield tokens, mask


def preservation_covariance(params: llama.Params, cfg: LlamaConfig, tokenizer, layers: int | Sequence[int],
                            spec: CovarianceHparams = CovarianceHparams(), *,
                            data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                            split: str = "train", text_field: str = "text", pad_multiple: int = 64,
                            layers_per_pass: int | None = None, progress: bool = True) -> dict[int, jax.Array]:
    """C0 = mean over corpus tokens of k k^T for each layer (k = down_proj input), cached on disk.

    Args:
      params, cfg: the model.
      tokenizer: its tokenizer (BOS added as the model expects).
      layers: the layer index or indices.
      spec: where C0 comes from: spec.corpus (a local text file; a bare file name is looked up in
        <data_dir>/corpus; or a Hugging Face dataset id "name[:config]", see CorpusSpec.parse),
        spec.n_samples token samples (documents, then further chunks; see corpus_samples) of at
        most spec.max_length tokens, spec.batch_size samples per forward pass.
      data_dir: the data folder for bare corpus names (default $JAXEDIT_DATA; jaxedit.data.paths).
      cache_dir: folder for the per-layer cache files; None disables caching.
      split, text_field: for hub datasets.
      pad_multiple: padded widths are multiples of this (capped at max_length): few compilations.
      layers_per_pass: at most this many layers per corpus pass (bounds the (Lr, F, F) accumulator's
        memory; None: all missing layers in one pass).
      progress: show a tqdm bar over batches.
    Returns:
      {layer: C0 (F, F) float32 jax.Array}.
    Raises:
      FileNotFoundError / RuntimeError: the corpus cannot be read (the message says what to do).
      ValueError: bad layers or sizes.
    """
    if not isinstance(spec, CovarianceHparams):
        raise TypeError(f"spec must be a CovarianceHparams, got {type(spec).__name__}")
    n_samples, max_length, batch_size = spec.n_samples, spec.max_length, spec.batch_size
    wanted = [int(layers)] if np.ndim(layers) == 0 else [int(l) for l in layers]
    bad = [l for l in wanted if not 0 <= l < cfg.num_hidden_layers]
    if bad or not wanted:
        raise ValueError(f"layers {wanted} must be non-empty and in [0, {cfg.num_hidden_layers})")
    wanted = sorted(set(wanted))
    corpus = CorpusSpec.parse(spec.corpus, split=split, text_field=text_field, data_dir=data_dir)
    f = cfg.intermediate_size

    out: dict[int, jax.Array] = {}
    keys: dict[int, dict] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        base = {"format": CACHE_FORMAT, "model": model_fingerprint(params, cfg),
                "tokenizer": tokenizer_fingerprint(tokenizer), "corpus_id": corpus.identity(), "n_samples": int(n_samples), "max_length": int(max_length),
                "dtype": cfg.dtype, "accumulation": "float32"}
        for layer in wanted:
            keys[layer] = dict(base, layer=layer)
            path = cache_file(cache_dir, keys[layer], corpus.tag())
            if not path.exists():
                continue
            matrix, why = read_cache(path, keys[layer], f)
            if matrix is None:
                logger.warning("covariance cache %s is %s; rebuilding it", path, why)
            else:
                logger.info("covariance of layer %d loaded from %s", layer, path)
                out[layer] = jnp.asarray(matrix)
    missing = [l for l in wanted if l not in out]
    if not missing:
        return out

    samples = corpus_samples(tokenizer, corpus.documents(), n_samples, max_length)
    if not samples:
        raise ValueError(f"corpus {corpus.describe()} produced no token samples")
    if len(samples) < n_samples:
        logger.warning("corpus %s gave only %d of the %d samples asked for", corpus.describe(), len(samples), n_samples)
    group = layers_per_pass or len(missing)
    for start in range(0, len(missing), group):
        todo = missing[start:start + group]
        sums, count = _corpus_pass(params, cfg, samples, todo, batch_size, tokenize.pad_id(tokenizer),
                                   max_length, pad_multiple, progress)
        for j, layer in enumerate(todo):
            c0 = sums[j] / count
            c0 = 0.5 * (c0 + c0.T)
            out[layer] = c0
            if cache_dir is not None:
                path = cache_file(cache_dir, keys[layer], corpus.tag())
                provenance = dict(keys[layer], corpus=corpus.describe(), n_samples_used=len(samples), n_tokens=count,
                                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
                write_cache(path, np.asarray(c0), count, provenance)
                logger.info("covariance of layer %d cached at %s", layer, path)
    return {l: out[l] for l in wanted}


def _corpus_pass(params, cfg, samples, layers, batch_size, pad_id, max_length, pad_multiple, progress):
    """(sums (Lr, F, F) float32, token count) over all samples, for `layers`, one pass."""
    layer_ids = jnp.asarray(layers, jnp.int32)
    total = jnp.zeros((len(layers), cfg.intermediate_size, cfg.intermediate_size), jnp.float32)
    count = 0
    n_batches = -(-len(samples) // batch_size)
    bar = tqdm(_batches(samples, batch_size, pad_id, max_length, pad_multiple), total=n_batches,
               desc=f"covariance of layers {layers}", unit="batch", disable=not progress)
    for tokens, mask in bar:
        sums, _ = covariance_pass(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), layer_ids)
        total = _accumulate(total, sums)
        count += int(mask.sum())  # from the host copy: no device sync per batch
    if count == 0:
        raise ValueError("the corpus samples contain no tokens")
    return total, count
