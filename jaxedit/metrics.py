"""CounterFact metrics as the ROME/MEMIT reference implementations define them, with batched jit scoring.

Scoring. A (prompt, target) pair is scored by the mean per-token negative log-likelihood of the target
tokens teacher-forced after the prompt: sequence = encode_prompt(prompt) (BOS kept if the tokenizer
adds one) + encode_target(target) (leading space, never a BOS), and the NLL of target token j is read
from the logits at the position before it. All pairs of a call are sorted by length, cut into buckets
of a padded width (a multiple of `multiple`) and a fixed batch size (dummy rows fill the last batch),
so only a few shapes are ever compiled; the unembedding is applied only at the target positions,
never to the whole (B, T, V) sequence.

Per case (all numbers in percent, as the papers report them; "new wins" = NLL(new) < NLL(true),
i.e. the higher mean-token probability, the reference's comparison):
  ES  rewrite prompt:          % of prompts where target_new wins         EM  mean p(new) - p(true)
  PS  paraphrase prompts:      % where target_new wins                    PM  mean p(new) - p(true)
  NS  neighbourhood prompts:   % where target_true still wins             NM  mean p(true) - p(new)
with p = exp(-mean token NLL). Aggregates are means over cases, S = harmonic mean of the aggregate
ES, PS, NS (0 if any is 0), and GE the mean generation n-gram entropy (bits; not a percentage).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax import model as lm_model
from llama3_flax.config import LlamaConfig

from . import tokenize
from .requests import EditRequest

_TARGET_SLOT_MULTIPLE = 4


# =============================================================================== pure scoring maths
def token_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """-log softmax(logits)[ids]: logits (..., V), ids (...) int -> (...) float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mean_target_nll(logits: jax.Array, ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean NLL over the valid target slots of each row.

    Args:
      logits: (B, P, V) logits predicting each target slot (i.e. taken at the position before it).
      ids: (B, P) target token ids.
      valid: (B, P) 1/True for real target tokens, 0 for padding slots.
    Returns:
      (B,) float32 mean NLL per row (0 for rows without any valid slot).
    """
    valid = valid.astype(jnp.float32)
    nll = token_nll(logits, ids) * valid
    return jnp.sum(nll, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1.0)


def sequence_target_nll(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Mean target NLL from full-sequence logits (the plain definition; used as a reference).

    Args:
      logits: (B, T, V) logits of every position.
      tokens: (B, T) token ids.
      target_mask: (B, T) 1 at the target tokens (never at position 0).
    Returns:
      (B,) mean over target tokens t of -log softmax(logits[t-1])[tokens[t]].
    """
    return mean_target_nll(logits[:, :-1], tokens[:, 1:], target_mask[:, 1:])


def target_slots(target_mask: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
    """The positions of the target tokens of each row, in order, in n_slots fixed slots.

    Args:
      target_mask: (B, T) 1 at target tokens.
      n_slots: P, at least the largest number of target tokens in a row.
    Returns:
      positions (B, P) int32 (0 in unused slots) and valid (B, P) bool.
    """
    b, t = target_mask.shape
    order = jnp.argsort(1 - target_mask.astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
    if n_slots > t:
        order = jnp.pad(order, ((0, 0), (0, n_slots - t)))
    positions = order[:, :n_slots]
    valid = jnp.arange(n_slots)[None, :] < jnp.sum(target_mask, axis=1, keepdims=True)
    return jnp.where(valid, positions, 0), valid


@functools.partial(jax.jit, static_argnames=("cfg", "n_slots"))
def score_batch(params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array, target_mask: jax.Array,
                n_slots: int) -> jax.Array:
    """Mean target NLL of each row of a right-padded batch, unembedding only at target positions.

    Args:
      tokens, mask: (B, T) right-padded prompt+target ids and padding mask.
      target_mask: (B, T) 1 at target tokens (a subset of the mask, never position 0).
      n_slots: static P >= the most target tokens of any row.
    Returns:
      (B,) float32 (0 for rows without target tokens, e.g. dummy rows).
    """
    h, _ = lm_model.run_layers(params, cfg, lm_model.embed(params, tokens), mask)
    positions, valid = target_slots(target_mask, n_slots)
    before = jnp.clip(positions - 1, 0, tokens.shape[1] - 1)
    h_before = jnp.take_along_axis(h, before[..., None], axis=1)          # (B, P, D)
    logits = lm_model.logits_from_hidden(params, cfg, h_before)           # (B, P, V)
    ids = jnp.take_along_axis(tokens, positions, axis=1)                  # (B, P)
    return mean_target_nll(logits, ids, valid)


# ========================================================================================= batching
@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A tokenised (prompt, target) pair: prompt ids (BOS as the tokenizer adds it), target ids (no BOS)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Indices (into the encoded pairs) of one batch, all padded to `width` tokens."""

    indices: tuple[int, ...]
    width: int


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[EncodedPair, ...]:
    """Tokenises (prompt, target) pairs, each distinct prompt and target once."""
    prompts: dict[str, tuple[int, ...]] = {}
    targets: dict[str, tuple[int, ...]] = {}
    out = []
    for prompt, target in pairs:
        if prompt not in prompts:
            ids = tuple(tokenize.encode_prompt(tokenizer, prompt))
            if not ids:
                raise ValueError(f"prompt {prompt!r} tokenises to nothing")
            prompts[prompt] = ids
        if target not in targets:
            targets[target] = tuple(tokenize.encode_target(tokenizer, target))
        out.append(EncodedPair(prompts[prompt], targets[target]))
    return tuple(out)


def plan_buckets(lengths: Sequence[int], batch_size: int, multiple: int = 8) -> tuple[Bucket, ...]:
    """Sorts sequences by length and cuts them into batches of at most batch_size sharing a width.

    Width = length rounded up to `multiple`, so the number of distinct shapes is the number of
    distinct rounded lengths (the batch dimension is always padded to batch_size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    by_width: dict[int, list[int]] = collections.defaultdict(list)
    for i in order:
        by_width[tokenize.bucket(lengths[i], multiple)].append(i)
    return tuple(Bucket(tuple(idx[s:s + batch_size]), width)
                 for width, idx in sorted(by_width.items()) for s in range(0, len(idx), batch_size))


def build_batch(encoded: Sequence[EncodedPair], bucket: Bucket, batch_size: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask, target_mask), each (batch_size, width) int32; rows past the bucket are dummies
    (all-zero mask and target mask)."""
    seqs = [encoded[i].prompt_ids + encoded[i].target_ids for i in bucket.indices]
    seqs += [(pad_id,)] * (batch_size - len(seqs))
    tokens, mask = tokenize.pad_right(seqs, pad_id, width=bucket.width)
    target_mask = np.zeros_like(mask)
    for row, i in enumerate(bucket.indices):
        start = len(encoded[i].prompt_ids)
        target_mask[row, start:start + len(encoded[i].target_ids)] = 1
    mask[len(bucket.indices):] = 0
    return tokens, mask, target_mask


def _progress(items, enabled: bool | None, desc: str, threshold: int = 8):
    items = list(items)
    if enabled or (enabled is None and len(items) > threshold):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc)
    return items


def score_encoded(params, cfg: LlamaConfig, encoded: Sequence[EncodedPair], pad_id: int,
                  batch_size: int = 32, multiple: int = 8, progress: bool | None = None) -> np.ndarray:
    """Mean target NLL (N,) float64 of tokenised pairs, in the order given (see score_pairs)."""
    if not encoded:
        return np.zeros((0,), np.float64)
    n_slots = tokenize.bucket(max(len(e.target_ids) for e in encoded), _TARGET_SLOT_MULTIPLE)
    out = np.zeros((len(encoded),), np.float64)
    buckets = plan_buckets([e.length for e in encoded], batch_size, multiple)
    for b in _progress(buckets, progress, "scoring"):
        tokens, mask, target_mask = build_batch(encoded, b, batch_size, pad_id)
        nll = score_batch(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target_mask),
                          n_slots)
        out[list(b.indices)] = np.asarray(jax.device_get(nll))[:len(b.indices)]
    return out


def score_pairs(params, cfg: LlamaConfig, tokenizer, pairs: Sequence[tuple[str, str]],
                batch_size: int = 32, multiple: int = 8, progress: bool | None = None) -> np.ndarray:
    """Mean per-token NLL of each target teacher-forced after its prompt, in bucketed jit batches.

    Args:
      pairs: N (prompt_text, target_text) pairs; targets without a leading space.
      batch_size: rows per jit call (the last batch of each width is padded with dummy rows).
      multiple: padded widths are multiples of this (fewer compilations vs. less padding).
    Returns:
      (N,) float64 mean target NLL (nats per token), in the order of `pairs`.
    """
    return score_encoded(params, cfg, encode_pairs(tokenizer, pairs), tokenize.pad_id(tokenizer),
                         batch_size, multiple, progress)


# ===================================================================================== case metrics
@dataclasses.dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case, in percent (nan where the case has no prompt of that kind).

    rewrite_nll, paraphrase_nll, neighborhood_nll: per prompt (NLL(target_new), NLL(target_true)).
    ge: mean n-gram entropy of generations from the case's generation prompts (None if not measured).
    """

    case_id: Any
    es: float
    ps: float
    ns: float
    em: float
    pm: float
    nm: float
    rewrite_nll: tuple[tuple[float, float], ...] = ()
    paraphrase_nll: tuple[tuple[float, float], ...] = ()
    neighborhood_nll: tuple[tuple[float, float], ...] = ()
    ge: float | None = None


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """Means over cases (percent; ge in bits, None if not measured); s = harmonic mean of es, ps, ns."""

    n_cases: int
    es: float
    ps: float
    ns: float
    em: float
    pm: float
    nm: float
    s: float
    ge: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    cases: tuple[CaseMetrics, ...]
    aggregate: Aggregate
    seconds: float = 0.0


def win_rate(nll_winner: np.ndarray, nll_loser: np.ndarray) -> float:
    """Percent of prompts where nll_winner < nll_loser strictly (nan for no prompts)."""
    w, l = np.asarray(nll_winner, np.float64), np.asarray(nll_loser, np.float64)
    return float("nan") if w.size == 0 else float(100.0 * np.mean(w < l))


def prob_margin(nll_winner: np.ndarray, nll_loser: np.ndarray) -> float:
    """Percent mean of exp(-nll_winner) - exp(-nll_loser) (nan for no prompts)."""
    w, l = np.asarray(nll_winner, np.float64), np.asarray(nll_loser, np.float64)
    return float("nan") if w.size == 0 else float(100.0 * np.mean(np.exp(-w) - np.exp(-l)))


def _pairs(x) -> np.ndarray:
    a = np.asarray(x, np.float64).reshape(-1, 2)
    return a


def case_metrics(case_id: Any, rewrite_nll, paraphrase_nll, neighborhood_nll,
                 ge: float | None = None) -> CaseMetrics:
    """ES/PS/NS and EM/PM/NM of one case from (n, 2) arrays of (NLL(new), NLL(true)) per prompt."""
    r, p, n = _pairs(rewrite_nll), _pairs(paraphrase_nll), _pairs(neighborhood_nll)
    as_tuple = lambda a: tuple((float(x), float(y)) for x, y in a)
    return CaseMetrics(
        case_id=case_id,
        es=win_rate(r[:, 0], r[:, 1]), ps=win_rate(p[:, 0], p[:, 1]), ns=win_rate(n[:, 1], n[:, 0]),
        em=prob_margin(r[:, 0], r[:, 1]), pm=prob_margin(p[:, 0], p[:, 1]), nm=prob_margin(n[:, 1], n[:, 0]),
        rewrite_nll=as_tuple(r), paraphrase_nll=as_tuple(p), neighborhood_nll=as_tuple(n), ge=ge)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (or negative), nan if any is nan."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0 or np.any(np.isnan(v)):
        return float("nan")
    if np.any(v <= 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def _nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(np.mean(v)) if v.size else float("nan")


def aggregate(cases: Sequence[CaseMetrics]) -> Aggregate:
    """Means over cases (cases lacking a prompt kind are left out of that mean), S from the means."""
    if not cases:
        raise ValueError("no cases to aggregate")
    mean = {k: _nanmean([getattr(c, k) for c in cases]) for k in ("es", "ps", "ns", "em", "pm", "nm")}
    ges = [c.ge for c in cases if c.ge is not None]
    return Aggregate(n_cases=len(cases), s=harmonic_mean([mean["es"], mean["ps"], mean["ns"]]),
                     ge=_nanmean(ges) if ges else None, **mean)


# =============================================================================== generation entropy
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
    pad = tokenize.pad_id(tokenizer)
    out: list[str] = [""] * len(prompts)
    buckets = plan_buckets([len(e) for e in enc], spec.batch_size, spec.multiple)
    for k, b in enumerate(_progress(buckets, progress, "generating")):
        rows = [enc[i] for i in b.indices] + [[pad]] * (spec.batch_size - len(b.indices))
        tokens = np.full((spec.batch_size, b.width), pad, np.int32)
        mask = np.zeros((spec.batch_size, b.width), np.int32)
        for r, e in enumerate(rows):
            tokens[r, b.width - len(e):] = e
            mask[r, b.width - len(e):] = 1
        rng = jax.random.fold_in(jax.random.PRNGKey(spec.seed), k)
        new = gen.generate(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), rng, spec.max_new_tokens,
                           spec.top_k, spec.temperature)
        new = np.asarray(jax.device_get(new))
        for r, i in enumerate(b.indices):
            out[i] = prompts[i] + tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
    return out


# ========================================================================================= evaluate
def _case_prompts(r: EditRequest) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return (r.filled_prompt,), tuple(r.paraphrase_prompts), tuple(r.neighborhood_prompts)


def evaluate(params, cfg: LlamaConfig, tokenizer, requests: Sequence[EditRequest], batch_size: int = 32,
             with_generation: bool = False, multiple: int = 8, generation: GenerationSpec = GenerationSpec(),
             progress: bool | None = None) -> EvalResult:
    """CounterFact metrics of a model on cases (all prompt/target pairs scored together).

    Args:
      requests: cases with target_true (and paraphrase / neighbourhood prompts; generation prompts
        when with_generation).
      batch_size, multiple: see score_pairs.
      with_generation: also sample continuations of each case's generation prompts and report GE.
    Returns:
      EvalResult with per-case CaseMetrics and their Aggregate.
    """
    import time

    start = time.perf_counter()
    requests = tuple(requests)
    if not requests:
        raise ValueError("no cases to evaluate")
    for r in requests:
        if not isinstance(r, EditRequest):
            raise TypeError(f"expected EditRequest, got {type(r).__name__}")
        if r.target_true is None:
            raise ValueError(f"EditRequest {r.name}: field 'target_true' is needed for metrics")

    index: dict[tuple[str, str], int] = {}
    layout = []  # per case: three lists of (i_new, i_true)
    for r in requests:
        kinds = []
        for prompts in _case_prompts(r):
            ids = []
            for p in prompts:
                ids.append(tuple(index.setdefault((p, t), len(index)) for t in (r.target_new, r.target_true)))
            kinds.append(ids)
        layout.append(kinds)
    nll = score_pairs(params, cfg, tokenizer, list(index), batch_size, multiple, progress)

    ges: list[float | None] = [None] * len(requests)
    if with_generation:
        owners = [(c, p) for c, r in enumerate(requests) for p in r.generation_prompts]
        texts = generate_texts(params, cfg, tokenizer, [p for _, p in owners], generation, progress)
        per_case: dict[int, list[str]] = collections.defaultdict(list)
        for (c, _), t in zip(owners, texts):
            per_case[c].append(t)
        ges = [mean_ngram_entropy(per_case[c]) if per_case.get(c) else None for c in range(len(requests))]

    cases = tuple(
        case_metrics(r.case_id, *[nll[np.asarray(ids, np.int64).reshape(-1, 2)] for ids in kinds], ge=ge)
        for r, kinds, ge in zip(requests, layout, ges))
    return EvalResult(cases=cases, aggregate=aggregate(cases), seconds=time.perf_counter() - start)


# ========================================================================================== tables
_COLUMNS = ("es", "ps", "ns", "s", "em", "pm", "nm", "ge")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def format_table(rows: Mapping[str, Aggregate], columns: Sequence[str] = _COLUMNS) -> str:
    """A plain-text table, one row per named Aggregate (e.g. {"before": ..., "after": ...})."""
    columns = [c for c in columns if c != "ge" or any(a.ge is not None for a in rows.values())]
    name_w = max([4] + [len(n) for n in rows])
    head = f"{'':<{name_w}}  {'n':>5}  " + "  ".join(f"{c.upper():>6}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, a in rows.items():
        lines.append(f"{name:<{name_w}}  {a.n_cases:>5}  " + "  ".join(f"{_fmt(getattr(a, c)):>6}" for c in columns))
    return "\n".join(lines)


def format_before_after(before: Aggregate, after: Aggregate) -> str:
    """Before / after / change table of two aggregates."""
    delta = Aggregate(n_cases=after.n_cases, **{
        c: (None if getattr(before, c) is None or getattr(after, c) is None
            else getattr(after, c) - getattr(before, c)) for c in _COLUMNS})
    return format_table({"before": before, "after": after, "change": delta})
