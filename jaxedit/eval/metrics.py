"""CounterFact metrics as the ROME/MEMIT reference implementations define them.

Per case (all numbers in percent, as the papers report them; "new wins" = NLL(new) < NLL(true),
i.e. the higher mean-token probability, the reference's comparison):
  ES  rewrite prompt:          % of prompts where target_new wins         EM  mean p(new) - p(true)
  PS  paraphrase prompts:      % where target_new wins                    PM  mean p(new) - p(true)
  NS  neighbourhood prompts:   % where target_true still wins             NM  mean p(true) - p(new)
with p = exp(-mean token NLL) (jaxedit.eval.scoring). Aggregates are means over cases, S = harmonic
mean of the aggregate ES, PS, NS (0 if any is 0), and GE the mean generation n-gram entropy (bits;
not a percentage; jaxedit.eval.generation).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterable, Sequence

import numpy as np

from llama3_flax.config import LlamaConfig

from jaxedit.eval.generation import GenerationSpec, generate_texts, mean_ngram_entropy
from jaxedit.eval.scoring import LowRankEdits, encode_pairs, score_encoded
from jaxedit.requests import EditRequest


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


def _case_prompts(r: EditRequest) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return (r.filled_prompt,), tuple(r.paraphrase_prompts), tuple(r.neighborhood_prompts)


def evaluate(params, cfg: LlamaConfig, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16,
             with_generation: bool = False, row_width: int = 64, generation: GenerationSpec = GenerationSpec(),
             progress: bool | None = None, edits: LowRankEdits | None = None) -> EvalResult:
    """CounterFact metrics of a model on cases (all prompt/target pairs scored together).

    Args:
      requests: cases with target_true (and paraphrase / neighbourhood prompts; generation prompts
        when with_generation).
      batch_size, row_width: see score_pairs.
      with_generation: also sample continuations of each case's generation prompts and report GE.
      edits: independent edits of `params`, edit i made for case i (jaxedit.eval.independent): each
        case is scored on the model changed by its own edit alone, all cases in one pass, as if each
        edited model were materialised and evaluated on its case.
    Returns:
      EvalResult with per-case CaseMetrics and their Aggregate.
    """
    start = time.perf_counter()
    requests = tuple(requests)
    if not requests:
        raise ValueError("no cases to evaluate")
    for r in requests:
        if not isinstance(r, EditRequest):
            raise TypeError(f"expected EditRequest, got {type(r).__name__}")
        if r.target_true is None:
            raise ValueError(f"EditRequest {r.name}: field 'target_true' is needed for metrics")

    if edits is not None:
        if with_generation:
            raise ValueError("evaluate(edits=...) scores NLLs only; generate on a materialised edited model")
        if edits.n_edits != len(requests):
            raise ValueError(f"edits hold {edits.n_edits} edits for {len(requests)} cases: one edit per case")

    index: dict[tuple[int, str, str], int] = {}  # (edit, prompt, target): a pair once per model it runs on
    layout = []  # per case: three lists of (i_new, i_true)
    for c, r in enumerate(requests):
        model = c if edits is not None else 0
        kinds = []
        for prompts in _case_prompts(r):
            ids = []
            for p in prompts:
                ids.append(tuple(index.setdefault((model, p, t), len(index)) for t in (r.target_new, r.target_true)))
            kinds.append(ids)
        layout.append(kinds)
    pairs = list(index)
    nll = score_encoded(params, cfg, encode_pairs(tokenizer, [(p, t) for _, p, t in pairs]), batch_size, row_width,
                        progress, edit_of_pair=None if edits is None else [m for m, _, _ in pairs], edits=edits)

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
