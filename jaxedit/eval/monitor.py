"""Watching a long editing run: the model's general ability, its edits' retention, and a collapse guard.

A Monitor holds its inputs, loaded and tokenised once (held-out text, general-ability questions,
generation prompts), and the unedited model's measurements. `measure(params, cases_so_far)` gives
one JSON-able record: perplexity, general accuracy per task, generation entropy, the edited layers'
relative change ||W - W0|| / ||W0||, and retention (ES, the efficacy margin and NS over every case
edited so far). `CollapseRule.reason(unedited, now)` says whether a record shows a collapsed model;
a schedule's after_batch returns schedule.StopEditing with that reason to end the run there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxedit.data import general as general_data
from jaxedit.data.counterfact import load_generation_prompts
from jaxedit.data.paths import corpus_file, data_dir
from jaxedit.eval import general
from jaxedit.eval.generation import GenerationSpec, generate_texts, mean_ngram_entropy
from jaxedit.eval.metrics import evaluate


@dataclasses.dataclass(frozen=True)
class MonitorSpec:
    """What a Monitor measures.

    every: edits between measurements (the run's programs measure after the batch that reaches a
      multiple of it, and after the last).
    tasks, questions: general-ability tasks (jaxedit.data.general) and questions per task.
    heldout, heldout_tokens, window: perplexity text (a corpus file name or path), tokens scored,
      tokens per window.
    generation_prompts, generation_tokens: CounterFact generation prompts sampled for entropy (0: none).
    """

    every: int = 64
    tasks: tuple[str, ...] = general_data.TASKS
    questions: int = 100
    heldout: str = "wikitext-103-test.tokens"
    heldout_tokens: int = 16384
    window: int = 128
    generation_prompts: int = 32
    generation_tokens: int = 40

    def __post_init__(self):
        for name in ("every", "questions", "heldout_tokens", "window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MonitorSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_prompts < 0 or self.generation_tokens < 1:
            raise ValueError("MonitorSpec.generation_prompts must be >= 0 and generation_tokens >= 1")
        unknown = sorted(set(self.tasks) - set(general_data.TASKS))
        if unknown:
            raise ValueError(f"MonitorSpec.tasks: unknown tasks {unknown}; known: {', '.join(general_data.TASKS)}")


@dataclasses.dataclass(frozen=True)
class CollapseRule:
    """A model has collapsed when its held-out perplexity exceeds `perplexity_ratio` x the unedited
    one, or its mean general accuracy falls to within `accuracy_over_chance` of chance (points) from
    above it (a model that is at chance unedited cannot fall there: that test then says nothing).
    Either test is off when its threshold is None."""

    perplexity_ratio: float | None = 2.0
    accuracy_over_chance: float | None = 0.0

    def reason(self, unedited: dict, now: dict) -> str | None:
        if self.perplexity_ratio is not None and now["perplexity"] > self.perplexity_ratio * unedited["perplexity"]:
            return (f"collapse: perplexity {now['perplexity']:.4g} > {self.perplexity_ratio:g} x unedited "
                    f"{unedited['perplexity']:.4g}")
        if self.accuracy_over_chance is not None and now.get("general_accuracy") is not None:
            limit = now["general_chance"] + self.accuracy_over_chance
            if now["general_accuracy"] <= limit < unedited["general_accuracy"]:
                return (f"collapse: mean general accuracy {now['general_accuracy']:.1f} <= chance "
                        f"{now['general_chance']:.1f} + {self.accuracy_over_chance:g}")
        return None


class Monitor:
    """Measures a model during a long run against the unedited one (see the module docstring)."""

    def __init__(self, params, cfg, tokenizer, edited_layers: Sequence[int], spec: MonitorSpec = MonitorSpec(),
                 data=None, progress: bool | None = False):
        self.cfg, self.tokenizer, self.spec, self.progress = cfg, tokenizer, spec, progress
        self.layers = tuple(int(l) for l in edited_layers)
        self.original = {l: np.asarray(params["layers"]["down_proj"][l], np.float64) for l in self.layers}
        path = corpus_file(spec.heldout, data)
        self.heldout = general.heldout_text(tokenizer, path, spec.heldout_tokens, spec.window)
        self.questions = {t: general_data.load_general_task(t, spec.questions, data=data) for t in spec.tasks}
        prompts = (load_generation_prompts(data_dir(data) / "counterfact" / "generation_prompts.json")
                   if spec.generation_prompts else ())
        self.generation_prompts = tuple(prompts[:spec.generation_prompts])
        self.unedited = self.measure(params, ())

    def measure(self, params, cases_so_far: Sequence = ()) -> dict:
        """One record (floats in percent where they are rates)."""
        record = {"perplexity": general.perplexity(params, self.cfg, self.heldout, progress=self.progress),
                  "perplexity_tokens": self.heldout.n_scored}
        scores = general.general_accuracy(params, self.cfg, self.tokenizer, self.questions, progress=self.progress)
        record["general"] = {t: 100.0 * s.accuracy for t, s in scores.items()}
        record["general_accuracy"] = float(np.mean(list(record["general"].values())))
        record["general_chance"] = 100.0 * float(np.mean([s.chance for s in scores.values()]))
        if self.generation_prompts:
            texts = generate_texts(params, self.cfg, self.tokenizer, self.generation_prompts,
                                   GenerationSpec(max_new_tokens=self.spec.generation_tokens), self.progress)
            record["generation_entropy"] = mean_ngram_entropy(texts)
        record["weight_change"] = {
            str(l): float(np.linalg.norm(np.asarray(params["layers"]["down_proj"][l], np.float64) - w0)
                          / np.linalg.norm(w0)) for l, w0 in self.original.items()}
        if cases_so_far:
            res = evaluate(params, self.cfg, self.tokenizer, cases_so_far, progress=self.progress)
            agg = res.aggregate
            record["retention"] = {"n_cases": agg.n_cases, "es": agg.es, "em": agg.em, "ps": agg.ps, "ns": agg.ns,
                                   "s": agg.s}
            # per case, for intervals over cases (experiments.lifelong_summary)
            record["retention_cases"] = {k: [getattr(c, k) for c in res.cases] for k in ("es", "em", "ps", "ns")}
        return _finite_or_none(record)


def _finite_or_none(record: dict) -> dict:
    """JSON has no NaN or inf: such a measurement is recorded as None."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return clean(record)
