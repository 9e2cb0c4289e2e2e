"""The preservation covariance C0 = E[k k^T] of down_proj inputs (keys) over a text corpus.

Axis vocabulary: B batch, T token slots, F MLP width (the key size), Lr requested layers.

`covariance_pass` runs the model once over a batch of rows and accumulates sum_t k_t k_t^T over the
non-pad tokens for every requested layer (layers are data: any set of the same size reuses one
compilation). `preservation_covariance` packs the corpus samples densely into rows (short samples
share a row, each attending only to itself), streams them through one pass for all requested layers
(as many as the accumulator bound allows) and caches each layer's C0 on disk with its provenance
(model fingerprint, tokenizer, corpus, sample count, length) and a sha256 checksum; a corrupt or
mismatched cache file is reported and rebuilt, never used.

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
from llama3_flax.sharding import mesh_of, rows_over_data

from jaxedit import packing
from jaxedit.cache import model_fingerprint, tokenizer_fingerprint
from jaxedit.data.corpus import CorpusSpec, corpus_samples
from jaxedit.editing import tokenize
from jaxedit.editing.covariance_cache import CACHE_FORMAT, cache_file, read_cache, write_cache
from jaxedit.hparams import PRODUCT_DTYPES, CovarianceHparams
from jaxedit.distributed import is_writer, to_host

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ one pass
QUERY_BLOCK = 64  # query slots per attention block of a corpus row (llama3_flax.blocked_attention)


def _key_outer_sums(params: llama.Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array, layers: jax.Array,
                    positions: jax.Array | None, key_ends: jax.Array | None, total: jax.Array,
                    product_dtype: str) -> jax.Array:
    """total + the sums of key outer products of one batch (see covariance_pass), pure.

    The layers run up to the last requested one and no further (scan_layers' while loop: a
    data-dependent trip count). A requested layer's product (F, F) is computed in a cond and added
    into its slot of the (Lr, F, F) accumulator outside the cond, where the loop updates it in place
    (a cond that took the accumulator itself would copy it).
    """
    layers = jnp.asarray(layers, jnp.int32)
    if layers.ndim != 1:
        raise ValueError(f"layers must be a 1-D array of layer indices, got shape {layers.shape}")
    if product_dtype not in PRODUCT_DTYPES:
        raise ValueError(f"product_dtype must be one of {PRODUCT_DTYPES}, got {product_dtype!r}")
    f = cfg.intermediate_size
    cos, sin, bias = llama.layer_context(cfg, mask, positions, key_ends)
    valid = mask.astype(bool).reshape(-1, 1)
    block = min(QUERY_BLOCK, tokens.shape[1])

    def outer(mlp_in):
        k = jnp.where(valid, mlp_in.reshape(-1, f), 0)
        if product_dtype == "float32":
            k = k.astype(jnp.float32)
            return jnp.einsum("nf,ng->fg", k, k, precision=jax.lax.Precision.HIGHEST)
        k = k.astype(product_dtype)  # rounded keys, float32 sums (tensor-core / AMX rate)
        return jnp.einsum("nf,ng->fg", k, k, preferred_element_type=jnp.float32)

    def active(i, lp, carry):
        h, total = carry
        h, mlp_in, _ = llama.decoder_layer(cfg, lp, h, cos, sin, bias, query_block=block)
        hit = layers == i
        kk = jax.lax.cond(jnp.any(hit), outer, lambda _: jnp.zeros((f, f), jnp.float32), mlp_in)
        return (h, total.at[jnp.argmax(hit)].add(kk)), None

    (_, total), _ = llama.scan_layers(params, cfg, (llama.embed(params, tokens), total), active, None,
                                      last_layer=jnp.max(layers), stop_after_last=True)
    return total


@functools.partial(jax.jit, static_argnames=("cfg", "product_dtype"))
def covariance_pass(params: llama.Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array,
                    layers: jax.Array, positions: jax.Array | None = None, key_ends: jax.Array | None = None,
                    product_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
    """Sums of key outer products over the non-pad tokens of one batch, for several layers at once.

    One forward pass (a loop over the stacked layers that stops after the last requested one); the
    outer product is computed only at requested layers. Rows may pack several samples (positions and
    key_ends as for llama3_flax.model.layer_context).

    Args:
      params: model parameters (layers stacked on axis 0).
      cfg: the model config (static).
      tokens: (B, T) int token ids.
      mask: (B, T) 1 for real tokens, 0 for padding (rows of only padding are allowed).
      layers: (Lr,) int layer indices, distinct (data: another set of the same size does not recompile).
      positions: (B, T) RoPE positions (default: counted over each row's real tokens).
      key_ends: (B, T) the slot after each token's sample in its row (default: one sample per row).
      product_dtype: "float32" (default), or "bfloat16": keys rounded to bfloat16, products summed in
        float32 (for accelerators; see CovarianceHparams.product_dtype).
    Returns:
      (sums (Lr, F, F) float32 with sums[j] = sum over real tokens of k k^T at layers[j],
       count () int32, the number of real tokens).
    """
    layers = jnp.asarray(layers, jnp.int32)
    f = cfg.intermediate_size
    zeros = jnp.zeros((layers.shape[0], f, f), jnp.float32)
    sums = _key_outer_sums(params, cfg, tokens, mask, layers, positions, key_ends, zeros, product_dtype)
    return sums, jnp.sum(mask.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "product_dtype"), donate_argnums=(0,))
def _accumulate_pass(total: jax.Array, params: llama.Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array,
                     positions: jax.Array, key_ends: jax.Array, layers: jax.Array, product_dtype: str) -> jax.Array:
    """covariance_pass's sums added into a running total (donated: updated in place, no per-batch copy)."""
    return _key_outer_sums(params, cfg, tokens, mask, layers, positions, key_ends, total, product_dtype)


# ------------------------------------------------------------------------ driver
DEFAULT_ACCUMULATOR_BYTES = 8 << 30  # at most this much (Lr, F, F) float32 accumulator per pass


def row_width(samples: Sequence[Sequence[int]], max_length: int, pad_multiple: int) -> int:
    """The width of the packed rows: the longest sample rounded up to pad_multiple, at most max_length."""
    longest = max(len(s) for s in samples)
    return max(longest, min(packing.bucket(longest, pad_multiple), max_length))


def _batches(samples: list[list[int]], batch_size: int, pad_id: int, max_length: int, pad_multiple: int):
    """Fixed-shape batches of packed rows: (tokens, mask, positions, key_ends), each (batch_size, W).

    Samples go into rows first-fit decreasing (full-length samples fill a row alone; the short tails
    of articles share rows); each sees only itself (key_ends: the slot after its own sample) and has
    RoPE positions from 0. All batches have one shape: one compilation; the last is completed with
    rows of only padding.
    """
    width = row_width(samples, max_length, pad_multiple)
    rows = packing.first_fit_decreasing([len(s) for s in samples], width)
    for i in range(0, len(rows), batch_size):
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        positions = np.zeros((batch_size, width), np.int32)
        key_ends = np.zeros((batch_size, width), np.int32)
        for j, members in enumerate(rows[i:i + batch_size]):
            at = 0
            for m in members:
                n = len(samples[m])
                tokens[j, at:at + n] = samples[m]
                mask[j, at:at + n] = 1
                positions[j, at:at + n] = np.arange(n)
                key_ends[j, at:at + n] = at + n
                at += n
        yield tokens, mask, positions, key_ends


def padding_share(samples: Sequence[Sequence[int]], batch_size: int = 8, max_length: int = 256,
                  pad_multiple: int = 64) -> float:
    """The share of the token slots run by preservation_covariance's passes that are padding."""
    width = row_width(samples, max_length, pad_multiple)
    n_rows = len(packing.first_fit_decreasing([len(s) for s in samples], width))
    slots = -(-n_rows // batch_size) * batch_size * width
    return 1.0 - sum(len(s) for s in samples) / slots


def preservation_covariance(params: llama.Params, cfg: LlamaConfig, tokenizer, layers: int | Sequence[int],
                            spec: CovarianceHparams = CovarianceHparams(), *,
                            data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                            split: str = "train", text_field: str = "text", pad_multiple: int = 64,
                            layers_per_pass: int | None = None,
                            max_accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
                            progress: bool = True) -> dict[int, jax.Array]:
    """C0 = mean over corpus tokens of k k^T for each layer (k = down_proj input), cached on disk.

    Args:
      params, cfg: the model.
      tokenizer: its tokenizer (BOS added as the model expects).
      layers: the layer index or indices.
      spec: where C0 comes from: spec.corpus (a local text file; a bare file name is looked up in
        <data_dir>/corpus; or a Hugging Face dataset id "name[:config]", see CorpusSpec.parse),
        spec.n_samples token samples (documents, then further chunks; see corpus_samples) of at
        most spec.max_length tokens, packed into rows of max_length token slots (short samples
        share a row), spec.batch_size rows per forward pass (every pass has the same shape), and
        spec.product_dtype for the outer products; spec.identity: C0 = I, no corpus read.
      data_dir: the data folder for bare corpus names (default $JAXEDIT_DATA; jaxedit.data.paths).
      cache_dir: folder for the per-layer cache files; None disables caching.
      split, text_field: for hub datasets.
      pad_multiple: the row width is the longest sample rounded up to this (capped at max_length).
      layers_per_pass: at most this many layers per corpus pass (None: as many as
        max_accumulator_bytes allows, all missing layers when they fit).
      max_accumulator_bytes: bound on the (Lr, F, F) float32 accumulator of one pass (4 F^2 bytes
        per layer), when layers_per_pass is None.
      progress: show a tqdm bar over batches.
    Returns:
      {layer: C0 (F, F) float32 jax.Array}.
    Raises:
      FileNotFoundError / RuntimeError: the corpus cannot be read (the message says what to do).
      ValueError: bad layers or sizes, or spec.max_length past cfg.max_position_embeddings.
    """
    if not isinstance(spec, CovarianceHparams):
        raise TypeError(f"spec must be a CovarianceHparams, got {type(spec).__name__}")
    n_samples, max_length, batch_size = spec.n_samples, spec.max_length, spec.batch_size
    if max_length > cfg.max_position_embeddings:  # RoPE past the trained positions: keys unlike any the model sees
        raise ValueError(f"covariance.max_length {max_length} exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings}): samples that long give keys the model never makes; "
                         f"set covariance max_length <= {cfg.max_position_embeddings}")
    wanted = [int(layers)] if np.ndim(layers) == 0 else [int(l) for l in layers]
    bad = [l for l in wanted if not 0 <= l < cfg.num_hidden_layers]
    if bad or not wanted:
        raise ValueError(f"layers {wanted} must be non-empty and in [0, {cfg.num_hidden_layers})")
    wanted = sorted(set(wanted))
    if spec.identity:  # ROME without the second-moment adjustment: C0 = I, nothing to measure
        return {l: jnp.eye(cfg.intermediate_size, dtype=jnp.float32) for l in wanted}
    corpus = CorpusSpec.parse(spec.corpus, split=split, text_field=text_field, data_dir=data_dir)
    f = cfg.intermediate_size

    out: dict[int, jax.Array] = {}
    keys: dict[int, dict] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        base = {"format": CACHE_FORMAT, "model": model_fingerprint(params, cfg),
                "tokenizer": tokenizer_fingerprint(tokenizer), "corpus_id": corpus.identity(), "n_samples": int(n_samples), "max_length": int(max_length),
                "dtype": cfg.dtype, "accumulation": "float32"}
        if spec.product_dtype != "float32":
            base["product"] = spec.product_dtype
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
    group = layers_per_pass or max(1, max_accumulator_bytes // (4 * f * f))
    for start in range(0, len(missing), group):
        todo = missing[start:start + group]
        sums, count = _corpus_pass(params, cfg, samples, todo, batch_size, tokenize.pad_id(tokenizer),
                                   max_length, pad_multiple, progress, spec.product_dtype)
        for j, layer in enumerate(todo):
            c0 = sums[j] / count
            c0 = 0.5 * (c0 + c0.T)
            out[layer] = c0
            if cache_dir is not None:
                path = cache_file(cache_dir, keys[layer], corpus.tag())
                provenance = dict(keys[layer], corpus=corpus.describe(), n_samples_used=len(samples), n_tokens=count,
                                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
                if is_writer():  # one process of a jax.distributed run writes the shared cache
                    write_cache(path, to_host(c0), count, provenance)
                logger.info("covariance of layer %d cached at %s", layer, path)
    return {l: out[l] for l in wanted}


def _corpus_pass(params, cfg, samples, layers, batch_size, pad_id, max_length, pad_multiple, progress,
                 product_dtype="float32"):
    """(sums (Lr, F, F) float32, token count) over all samples, for `layers`, one pass.

    Nothing here waits for the device: each batch is dispatched asynchronously into the donated
    running total, so the host packs the next batch while the device runs this one.
    """
    layer_ids = jnp.asarray(layers, jnp.int32)
    total = jnp.zeros((len(layers), cfg.intermediate_size, cfg.intermediate_size), jnp.float32)
    count = sum(len(s) for s in samples)
    if count == 0:
        raise ValueError("the corpus samples contain no tokens")
    width = row_width(samples, max_length, pad_multiple)
    n_batches = -(-len(packing.first_fit_decreasing([len(s) for s in samples], width)) // batch_size)
    bar = tqdm(_batches(samples, batch_size, pad_id, max_length, pad_multiple), total=n_batches,
               desc=f"covariance of layers {layers}", unit="batch", disable=not progress)
    mesh = mesh_of(params)
    for batch in bar:
        tokens, mask, positions, key_ends = rows_over_data(mesh, batch)  # rows over a mesh's data axis
        total = _accumulate_pass(total, params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions),
                                 jnp.asarray(key_ends), layer_ids, product_dtype)
    return total, count
