"""CounterFact metrics as the ROME/MEMIT reference implementations define them, with batched jit scoring.

Scoring. A (prompt, target) pair is scored by the mean per-token negative log-likelihood of the target
tokens teacher-forced after the prompt: sequence = encode_prompt(prompt) (BOS kept if the tokenizer
adds one) + encode_target(target) (leading space, never a BOS), and the NLL of target token j is read
from the logits at the position before it. Scoring packs all sequences of a call into rows of
`row_width` tokens as prefix trees (pack_token_trees): sequences sharing leading tokens (the two
targets of one prompt, prompts of one relation) share those tokens' computation, a tree-shaped
attention mask keeps every token to its own ancestors, and no row is padded to the longest
sequence. Rows go to the model `batch_size` at a time; the unembedding is applied once per token
that predicts a target token, never to the whole (B, T, V) sequence. Scoring runs at the params'
precision: model.matrices_as(params, jnp.bfloat16) scores with bfloat16 matmuls (float32 sums).

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


# =============================================================================== pure scoring maths
def token_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """-log softmax(logits)[ids]: logits (..., V), ids (...) int -> (...) float32.

    Computed as logsumexp - the target's logit, so the (..., V) log-probabilities are never written.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_tree_rows(params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, ends: jax.Array,
                    predictor_tok: jax.Array, score_predictor: jax.Array, score_ids: jax.Array) -> jax.Array:
    """Token NLLs read from rows of packed prefix trees.

    Args:
      tokens, positions, ends: (R, W) token ids, RoPE positions (depth in the tree) and subtree ends
        (see pack_token_trees; 0 marks padding).
      predictor_tok: (U,) flat token index (row * W + slot) of each distinct predicting token: it is
        unembedded once, however many targets it predicts (a prompt's last token predicts the first
        token of both of its targets).
      score_predictor, score_ids: (M,) which predictor (index into predictor_tok) predicts each scored
        token, and that token's id.
    Returns:
      (M,) float32 -log p(score_ids | the predicting token's ancestors).
    """
    h, _ = lm_model.run_layers(params, cfg, lm_model.embed(params, tokens), (ends > 0).astype(jnp.int32),
                               positions=positions, key_ends=ends)
    logits = lm_model.logits_from_hidden(params, cfg, h.reshape(-1, h.shape[-1])[predictor_tok])
    # token_nll(logits[score_predictor], ...) would copy an (M, V) block; gather the (M,) numbers instead
    picked = logits[score_predictor, score_ids]
    return jax.nn.logsumexp(logits, axis=-1)[score_predictor] - picked


# ========================================================================================= batching
@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A tokenised (prompt, target) pair: prompt ids (BOS as the tokenizer adds it), target ids (no BOS)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


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


@dataclasses.dataclass(frozen=True)
class TreeRow:
    """One row of packed prefix trees, in depth-first order: token ids, depths (RoPE positions) and
    the slot just after each token's subtree (a token sees exactly its ancestors and itself)."""

    tokens: tuple[int, ...]
    depths: tuple[int, ...]
    ends: tuple[int, ...]


def _prefix_tree_pieces(seqs: Sequence[Sequence[int]], width: int) -> list[tuple[list, list, list, list]]:
    """Cuts the sorted sequences into prefix trees of at most `width` tokens, in depth-first order.

    Sorted, each sequence shares its longest common prefix with the one before it, and only the
    tokens after that prefix are added, so the new tokens land in depth-first order and a token's
    subtree is the slot range [slot, end). A new piece starts at a new first token (nothing to
    share) or when the tree would outgrow the width (the shared prefix is then repeated).
    Returns per piece (tokens, depths, ends, [(sequence index, slots of its tokens)]).
    """
    pieces: list[tuple[list, list, list, list]] = []
    prev: tuple[int, ...] = ()
    prev_path: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: tuple(seqs[i])):
        seq = tuple(seqs[i])
        shared = 0
        while shared < min(len(seq), len(prev)) and seq[shared] == prev[shared]:
            shared += 1
        if shared == 0 or len(pieces[-1][0]) + len(seq) - shared > width:
            pieces.append(([], [], [], []))
            shared = 0
        tokens, depths, ends, members = pieces[-1]
        path = prev_path[:shared] + list(range(len(tokens), len(tokens) + len(seq) - shared))
        tokens += seq[shared:]
        depths += range(shared, len(seq))
        ends += [0] * (len(seq) - shared)
        for slot in path:  # every token of the path has this sequence's last token in its subtree
            ends[slot] = max(ends[slot], path[-1] + 1)
        members.append((i, path))
        prev, prev_path = seq, path
    return pieces


def pack_token_trees(seqs: Sequence[Sequence[int]], width: int) -> tuple[list[TreeRow], list[tuple[int, tuple[int, ...]]]]:
    """Packs token sequences into rows of at most `width` tokens, as prefix trees.

    Sequences sharing leading tokens share those tokens' slots (_prefix_tree_pieces); the trees go
    into rows first-fit in decreasing size, which leaves little padding at the rows' ends.
    Returns the rows and, per sequence, (row, slot of each of its tokens).
    """
    if any(len(s) > width for s in seqs):
        raise ValueError(f"a sequence of {max(len(s) for s in seqs)} tokens does not fit rows of width {width}")
    rows: list[tuple[list, list, list]] = []
    paths: list = [None] * len(seqs)
    for tokens, depths, ends, members in sorted(_prefix_tree_pieces(seqs, width), key=lambda p: -len(p[0])):
        r = next((r for r, row in enumerate(rows) if len(row[0]) + len(tokens) <= width), len(rows))
        if r == len(rows):
            rows.append(([], [], []))
        offset = len(rows[r][0])
        rows[r][0].extend(tokens)
        rows[r][1].extend(depths)
        rows[r][2].extend(e + offset for e in ends)
        for i, path in members:
            paths[i] = (r, tuple(offset + s for s in path))
    return [TreeRow(tuple(t), tuple(d), tuple(e)) for t, d, e in rows], paths


def _progress(items, enabled: bool | None, desc: str, threshold: int = 8):
    items = list(items)
    if enabled or (enabled is None and len(items) > threshold):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc)
    return items


def score_encoded(params, cfg: LlamaConfig, encoded: Sequence[EncodedPair], batch_size: int = 16,
                  row_width: int = 64, progress: bool | None = None) -> np.ndarray:
    """Mean target NLL (N,) float64 of tokenised pairs, in the order given (see score_pairs)."""
    if not encoded:
        return np.zeros((0,), np.float64)
    # the last target token is only ever predicted, never a predictor: it needs no slot
    seqs = [e.prompt_ids + e.target_ids[:-1] for e in encoded]
    width = max(row_width, tokenize.bucket(max(len(s) for s in seqs), 8))
    rows, paths = pack_token_trees(seqs, width)
    scored = collections.defaultdict(list)  # row -> (slot predicting, token, pair)
    for pair, (e, (row, path)) in enumerate(zip(encoded, paths)):
        n_prompt = len(e.prompt_ids)
        scored[row] += [(path[n_prompt + j - 1], tid, pair) for j, tid in enumerate(e.target_ids)]
    total = np.zeros((len(encoded),), np.float64)
    starts = range(0, len(rows), batch_size)
    for start in _progress(starts, progress, "scoring"):
        chunk = range(start, min(start + batch_size, len(rows)))
        n_rows = min(batch_size, tokenize.bucket(len(chunk), 2))  # a few shapes, little padding
        tokens, depths, ends = (np.zeros((n_rows, width), np.int32) for _ in range(3))
        slots = []
        for k, r in enumerate(chunk):
            n = len(rows[r].tokens)
            tokens[k, :n], depths[k, :n], ends[k, :n] = rows[r].tokens, rows[r].depths, rows[r].ends
            slots += [(k * width + slot, tid, pair) for slot, tid, pair in scored[r]]
        tok, ids, pair = (np.asarray(x) for x in zip(*slots))
        predictors, which = np.unique(tok, return_inverse=True)
        u, m = tokenize.bucket(len(predictors), 64), tokenize.bucket(len(slots), 64)
        pad = lambda a, n: jnp.asarray(np.pad(a, (0, n - len(a))))
        nll = score_tree_rows(params, cfg, jnp.asarray(tokens), jnp.asarray(depths), jnp.asarray(ends),
                              pad(predictors, u), pad(which, m), pad(ids, m))
        np.add.at(total, pair, np.asarray(jax.device_get(nll), np.float64)[:len(slots)])
    return total / np.asarray([len(e.target_ids) for e in encoded], np.float64)


def score_pairs(params, cfg: LlamaConfig, tokenizer, pairs: Sequence[tuple[str, str]],
                batch_size: int = 16, row_width: int = 64, progress: bool | None = None) -> np.ndarray:
    """Mean per-token NLL of each target teacher-forced after its prompt, in packed jit batches.

    Args:
      pairs: N (prompt_text, target_text) pairs; targets without a leading space.
      batch_size: rows per jit call (a short last call is padded to an even number of rows).
      row_width: tokens per row (widened to the longest sequence); each row packs many sequences.
    Returns:
      (N,) float64 mean target NLL (nats per token), in the order of `pairs`.
    """
    return score_encoded(params, cfg, encode_pairs(tokenizer, pairs), batch_size, row_width, progress)


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


def evaluate(params, cfg: LlamaConfig, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16,
             with_generation: bool = False, row_width: int = 64, generation: GenerationSpec = GenerationSpec(),
             progress: bool | None = None) -> EvalResult:
    """CounterFact metrics of a model on cases (all prompt/target pairs scored together).

    Args:
      requests: cases with target_true (and paraphrase / neighbourhood prompts; generation prompts
        when with_generation).
      batch_size, row_width: see score_pairs.
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
    nll = score_pairs(params, cfg, tokenizer, list(index), batch_size, row_width, progress)

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
