"""Fluency: continuations sampled from the model, and their n-gram entropy (ROME's generation entropy)."""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax.config import LlamaConfig

from jaxedit.editing import tokenize
from jaxedit.packing import plan_buckets
from jaxedit.progress import progress_bar
from jaxedit.distributed import to_host


_WORD_RE = re.compile(r"\w+(?=n't\b)|n't\b|'\w+|\w+|\.\.\.|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Word-level tokens close to nltk.word_tokenize (words; punctuation, "'s" and "n't" split off).

    nltk's punkt data cannot be assumed offline; on ordinary English this split agrees with it.
    """
    return _WORD_RE.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy of one text, as ROME's compute_n_gram_entropy defines it.

    For each n: the Shannon entropy in bits of the empirical n-gram distribution over word tokens
    (0 when the text has fewer than n tokens); the result is the arithmetic mean of weight_n * H_n.
    """
    tokens = word_tokens(text)
    values = []
    for n, w in zip(ns, weights):
        counts = np.array(list(collections.Counter(
            tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)).values()), np.float64)
        h = 0.0
        if counts.size:
            p = counts / counts.sum()
            h = float(-np.sum(p * np.log2(p)))
        values.append(w * h)
    return float(np.mean(values))


def mean_ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of ngram_entropy over texts (ROME's n_gram_entropy, agg="arith")."""
    if not texts:
        return float("nan")
    return float(np.mean([ngram_entropy(t) for t in texts]))


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """How continuations for generation entropy are sampled (ROME: top-k 5, 100 tokens in all).

    max_new_tokens: new tokens per prompt (the reference's 100 tokens include a ~10-token prompt).
    """

    max_new_tokens: int = 90
    top_k: int = 5
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    multiple: int = 8


def generate_texts(params, cfg: LlamaConfig, tokenizer, prompts: Sequence[str],
                   spec: GenerationSpec = GenerationSpec(), progress: bool | None = None) -> list[str]:
    """prompt + sampled continuation for each prompt, with llama3_flax.generate.generate.

    Prompts are left-padded into buckets of a few widths and a fixed batch size (like
    generate.generate_text, but without one compilation per prompt length).
    """
    from llama3_flax import generate as gen

    if not prompts:
        return []
    enc = [tokenize.encode_prompt(tokenizer, p) for p in prompts]
    for p, e in zip(prompts, enc):  # out-of-range ids would be clamped by JAX, not rejected
        tokenize.check_token_ids(e, cfg, f"generation prompt {p!r}")
    tokenize.check_lengths([len(e) + spec.max_new_tokens for e in enc], cfg,
                           f"generation prompt + max_new_tokens ({spec.max_new_tokens})")
    pad = tokenize.pad_id(tokenizer)
    out: list[str] = [""] * len(prompts)
    buckets = plan_buckets([len(e) for e in enc], spec.batch_size, spec.multiple)
    for k, b in enumerate(progress_bar(buckets, progress, "generating")):
        rows = [enc[i] for i in b.indices] + [[pad]] * (spec.batch_size - len(b.indices))
        tokens = np.full((spec.batch_size, b.width), pad, np.int32)
        mask = np.zeros((spec.batch_size, b.width), np.int32)
        for r, e in enumerate(rows):
            tokens[r, b.width - len(e):] = e
            mask[r, b.width - len(e):] = 1
        rng = jax.random.fold_in(jax.random.PRNGKey(spec.seed), k)
        new = gen.generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), rng, spec.max_new_tokens,
                           spec.top_k, spec.temperature)
        new = to_host(new)
        for r, i in enumerate(b.indices):
            out[i] = prompts[i] + tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
    return out
