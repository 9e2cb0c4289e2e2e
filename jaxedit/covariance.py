"""The preservation covariance C0 = E[k k^T] of down_proj inputs (keys) over a text corpus.

Axis vocabulary: B batch, T token slots, F MLP width (the key size), Lr requested layers.

`covariance_pass` runs the model once over a padded batch and accumulates sum_t k_t k_t^T over the
non-pad tokens for every requested layer (layers are data: any set of the same size reuses one
compilation). `preservation_covariance` streams a corpus through it and caches each layer's C0 on
disk with its provenance (model fingerprint, tokenizer, corpus, sample count, length) and a sha256
checksum; a corrupt or mismatched cache file is reported and rebuilt, never used.

Corpora: a local text file (WikiText .tokens/.txt files are split into articles at ` = Title = `
lines; other files into paragraphs at blank lines), or a Hugging Face dataset id "name[:config]"
(streamed; needs internet), e.g. "wikitext:wikitext-103-raw-v1" or "wikipedia:20220301.en".
The reference implementations use 100k Wikipedia articles truncated to the model's context.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from llama3_flax import model as llama
from llama3_flax.config import LlamaConfig

from . import tokenize
from .cache import atomic_write_bytes, model_fingerprint

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
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

    def step(carry, xs):
        h, acc = carry
        i, lp = xs
        hit = layers == i

        def run(h):
            h, mlp_in, _ = llama.decoder_layer(cfg, lp, h, cos, sin, bias)
            return h, jax.lax.cond(jnp.any(hit), outer, lambda _: zeros, mlp_in)

        h, kk = jax.lax.cond(i <= last, run, lambda h: (h, zeros), h)
        acc = acc.at[jnp.argmax(hit)].add(kk)  # adds zeros where no layer is requested
        return (h, acc), None

    acc0 = jnp.zeros((layers.shape[0], f, f), jnp.float32)
    h0 = llama.embed(params, tokens)
    (_, acc), _ = jax.lax.scan(step, (h0, acc0), (jnp.arange(cfg.num_hidden_layers), params["layers"]))
    return acc, jnp.sum(mask.astype(jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(total: jax.Array, sums: jax.Array) -> jax.Array:
    return total + sums


# ----------------------------------------------------------------------- corpora
def _is_wikitext_title(line: str) -> bool:
    """` = Title = ` starts an article; ` = = Section = = ` does not."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Splits WikiText lines into articles, each starting with its ` = Title = ` line.

    Args:
      lines: the lines of a WikiText file (or the rows of a WikiText dataset), newlines optional.
    Yields:
      each article's text (title line included, blank lines dropped), in order.
    """
    article: list[str] = []
    for line in lines:
        if _is_wikitext_title(line) and any(not _is_wikitext_title(a) for a in article):
            yield "\n".join(article)
            article = []
        if line.strip():
            article.append(line.strip())
    if article:
        yield "\n".join(article)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_text_corpus(path: str | os.PathLike) -> list[str]:
    """The documents of a local text file: WikiText articles if it has ` = Title = ` lines, else
    paragraphs separated by blank lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist (pass a local text file, e.g. a "
                                f"WikiText .tokens file, or a Hugging Face dataset id such as "
                                f"'wikitext:wikitext-103-raw-v1')")
    lines = path.read_text(encoding="utf-8").splitlines()
    if any(_is_wikitext_title(line) for line in lines):
        return list(wikitext_articles(lines))
    return list(_paragraphs(lines))


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where the text comes from: a local file (`path`) or a hub dataset (`dataset`, `config`, `split`)."""

    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @classmethod
    def parse(cls, corpus: str | os.PathLike, split: str = "train", text_field: str = "text") -> "CorpusSpec":
        """A local path if it exists or looks like one (a .txt/.tokens suffix, a leading / . or ~),
        else a hub id "name[:config]" (prefix "hf:" to force)."""
        s = str(corpus)
        if s.startswith("hf:"):
            s = s[3:]
        elif (Path(s).expanduser().exists() or s.startswith(("/", ".", "~"))
              or s.lower().endswith(_LOCAL_SUFFIXES) or isinstance(corpus, os.PathLike)):
            return cls(path=str(Path(s).expanduser().resolve()))
        name, _, config = s.partition(":")
        if not name:
            raise ValueError(f"corpus {corpus!r} is neither a local file nor a dataset id 'name[:config]'")
        return cls(dataset=name, config=config or None, split=split, text_field=text_field)

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"hf:{self.dataset}" + (f":{self.config}" if self.config else "") + f" [{self.split}]"

    def tag(self) -> str:
        """A short readable name for file names."""
        return Path(self.path).name if self.path else f"{self.dataset}-{self.config or ''}-{self.split}"

    def identity(self) -> str:
        """A string that changes when the text does: the file's sha256, or the dataset coordinates."""
        if self.path:
            p = Path(self.path)
            if not p.is_file():
                read_text_corpus(p)  # raises the clear error
            digest = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            return f"file:{p.name}:sha256:{digest.hexdigest()}"
        return f"hf:{self.dataset}:{self.config}:{self.split}:{self.text_field}"

    def documents(self) -> Iterator[str]:
        """The documents (articles), streamed for hub datasets."""
        if self.path:
            yield from read_text_corpus(self.path)
            return
        yield from _hub_documents(self)


def _hub_documents(spec: CorpusSpec) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ImportError("reading a hub corpus needs the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=True)
        rows = iter(ds)
        first = next(rows)
    except Exception as e:
        raise RuntimeError(
            f"could not load the Hugging Face dataset {spec.dataset!r} (config {spec.config!r}, split "
            f"{spec.split!r}): {type(e).__name__}: {e}. Without internet (or with HF_DATASETS_OFFLINE=1) "
            f"pass a local text file instead, e.g. a WikiText .tokens file") from e
    if spec.text_field not in first:
        raise KeyError(f"dataset {spec.dataset!r} rows have no field {spec.text_field!r} (fields: {sorted(first)})")

    def texts():
        yield first[spec.text_field]
        for row in rows:
            yield row[spec.text_field]

    if "wikitext" in spec.dataset.lower():  # one row per line: rebuild the articles
        yield from wikitext_articles(texts())
    else:
        yield from (t for t in texts() if t and t.strip())


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (BOS for Llama-3, nothing for SmolLM2)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def corpus_samples(tokenizer, documents: Iterable[str], n_samples: int, max_length: int) -> list[list[int]]:
    """Token samples of at most max_length tokens (special prefix such as BOS included).

    Each document gives its first max_length tokens, as in the reference implementations; when the
    corpus has fewer than n_samples documents, later chunks of the documents are used too (all
    second chunks, then all third chunks, ...), so a small local corpus still yields n_samples.

    Returns:
      up to n_samples lists of token ids (fewer if the corpus is exhausted).
    """
    if n_samples <= 0 or max_length <= 0:
        raise ValueError(f"n_samples ({n_samples}) and max_length ({max_length}) must be positive")
    prefix = _special_prefix(tokenizer)
    body = max_length - len(prefix)
    if body <= 0:
        raise ValueError(f"max_length {max_length} leaves no room after the special prefix {prefix}")
    samples: list[list[int]] = []
    later: list[list[list[int]]] = []  # per document, its chunks after the first
    spare = 0
    for doc in documents:
        ids = list(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        chunks = [prefix + ids[i:i + body] for i in range(0, len(ids), body)]
        if not chunks:
            continue
        samples.append(chunks[0])
        if len(samples) == n_samples:
            return samples
        if spare < n_samples:
            later.append(chunks[1:])
            spare += len(chunks) - 1
    depth = 0
    while len(samples) < n_samples and any(len(c) > depth for c in later):
        for chunks in later:
            if len(chunks) > depth:
                samples.append(chunks[depth])
                if len(samples) == n_samples:
                    return samples
        depth += 1
    return samples


# ------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary size, special ids and the ids of a probe text."""
    probe = tokenizer("The quick brown fox, 1995 — Zürich; déjà vu.")["input_ids"]
    info = [len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, list(probe)]
    return hashlib.sha256(json.dumps(info).encode()).hexdigest()[:16]


def _cache_file(cache_dir: Path, key: dict, corpus_tag: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9.-]+", "-", corpus_tag)[:40].strip("-")
    short = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / (f"cov_{key['model']}_L{key['layer']:03d}_{tag}_n{key['n_samples']}"
                        f"_len{key['max_length']}_{key['dtype']}_{short}.npz")


def _write_cache(path: Path, matrix: np.ndarray, count: int, provenance: dict) -> None:
    """Atomically writes an .npz with the matrix, its token count, provenance JSON and sha256."""
    matrix = np.ascontiguousarray(matrix, np.float32)
    buf = io.BytesIO()
    np.savez(buf, matrix=matrix, count=np.int64(count), provenance=np.str_(json.dumps(provenance, sort_keys=True)),
             sha256=np.str_(hashlib.sha256(matrix.tobytes()).hexdigest()))
    atomic_write_bytes(path, buf.getvalue())


def _read_cache(path: Path, key: dict, f: int) -> tuple[np.ndarray | None, str]:
    """(matrix, "") from a valid cache file, else (None, why it cannot be used)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            matrix = np.array(z["matrix"])
            provenance = json.loads(str(z["provenance"]))
            digest = str(z["sha256"])
            int(z["count"])
    except Exception as e:  # truncated, bit-flipped (zip CRC), missing members, bad JSON
        return None, f"unreadable ({type(e).__name__}: {e})"
    if hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest() != digest:
        return None, "corrupt (sha256 checksum of the matrix does not match)"
    wrong = sorted(k for k in key if provenance.get(k) != key[k])
    if wrong:
        return None, "for another setting (provenance differs in " + ", ".join(
            f"{k}: {provenance.get(k)!r} != {key[k]!r}" for k in wrong) + ")"
    if matrix.shape != (f, f) or matrix.dtype != np.float32 or not np.all(np.isfinite(matrix)):
        return None, f"malformed (shape {matrix.shape}, dtype {matrix.dtype}, or non-finite values)"
    return matrix, ""


# ------------------------------------------------------------------------ driver
def _batches(samples: list[list[int]], batch_size: int, pad_id: int, max_length: int, pad_multiple: int):
    """Fixed-shape padded batches (B = batch_size; widths bucketed), longest samples first."""
    order = sorted(samples, key=len, reverse=True)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = min(tokenize.bucket(len(chunk[0]), pad_multiple), max_length)
        chunk = chunk + [[]] * (batch_size - len(chunk))  # padding rows (mask 0)
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for j, s in enumerate(chunk):
            tokens[j, :len(s)] = s
            mask[j, :len(s)] = 1
        yield tokens, mask


def preservation_covariance(params: llama.Params, cfg: LlamaConfig, tokenizer, corpus: str | os.PathLike,
                            layers: int | Sequence[int], n_samples: int = 1000, max_length: int = 256,
                            batch_size: int = 8, cache_dir: str | os.PathLike | None = None, *,
                            split: str = "train", text_field: str = "text", pad_multiple: int = 64,
                            layers_per_pass: int | None = None, progress: bool = True
                            ) -> dict[int, jax.Array]:
    """C0 = mean over corpus tokens of k k^T for each layer (k = down_proj input), cached on disk.

    Args:
      params, cfg: the model.
      tokenizer: its tokenizer (BOS added as the model expects).
      corpus: a local text file, or a Hugging Face dataset id "name[:config]" (see CorpusSpec.parse).
      layers: the layer index or indices.
      n_samples: number of token samples (documents, then further chunks; see corpus_samples).
      max_length: tokens per sample at most.
      batch_size: samples per forward pass (fixed shape; the last batch is padded).
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
    wanted = [int(layers)] if np.ndim(layers) == 0 else [int(l) for l in layers]
    bad = [l for l in wanted if not 0 <= l < cfg.num_hidden_layers]
    if bad or not wanted:
        raise ValueError(f"layers {wanted} must be non-empty and in [0, {cfg.num_hidden_layers})")
    wanted = sorted(set(wanted))
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spec = CorpusSpec.parse(corpus, split=split, text_field=text_field)
    f = cfg.intermediate_size

    out: dict[int, jax.Array] = {}
    keys: dict[int, dict] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        base = {"format": CACHE_FORMAT, "model": model_fingerprint(params, cfg),
                "tokenizer": tokenizer_fingerprint(tokenizer), "corpus_id": spec.identity(), "n_samples": int(n_samples), "max_length": int(max_length),
                "dtype": cfg.dtype, "accumulation": "float32"}
        for layer in wanted:
            keys[layer] = dict(base, layer=layer)
            path = _cache_file(cache_dir, keys[layer], spec.tag())
            if not path.exists():
                continue
            matrix, why = _read_cache(path, keys[layer], f)
            if matrix is None:
                logger.warning("covariance cache %s is %s; rebuilding it", path, why)
            else:
                logger.info("covariance of layer %d loaded from %s", layer, path)
                out[layer] = jnp.asarray(matrix)
    missing = [l for l in wanted if l not in out]
    if not missing:
        return out

    samples = corpus_samples(tokenizer, spec.documents(), n_samples, max_length)
    if not samples:
        raise ValueError(f"corpus {spec.describe()} produced no token samples")
    if len(samples) < n_samples:
        logger.warning("corpus %s gave only %d of the %d samples asked for", spec.describe(), len(samples), n_samples)
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
                path = _cache_file(cache_dir, keys[layer], spec.tag())
                provenance = dict(keys[layer], corpus=spec.describe(), n_samples_used=len(samples), n_tokens=count,
                                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
                _write_cache(path, np.asarray(c0), count, provenance)
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
