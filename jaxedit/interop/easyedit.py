"""EasyEdit's editor API in front of jaxedit: an editor built from an EasyEdit hparams file whose
`edit` takes EasyEdit's arguments and returns (metrics, edited params) in EasyEdit's metric layout.

    from jaxedit.interop.easyedit import BaseEditor

    editor = BaseEditor.from_hparams("hparams/MEMIT/qwen2.5-7b.yaml", model=(cfg, params, tokenizer))
    metrics, edited = editor.edit(prompts=["The mother tongue of Danielle Darrieux is"], ground_truth=["French"],
                                  target_new=["English"], subject=["Danielle Darrieux"],
                                  rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
                                  locality_inputs={"neighborhood": {"prompt": ["Michel Rocard is a native speaker of"],
                                                                    "ground_truth": ["French"]}})

A thin layer: the edit is jaxedit.edit (sequential_edit=True: jaxedit.sequential_edit), scored by
jaxedit.evaluate and jaxedit.eval.token_accuracy; C0 and the context templates come from
jaxedit.preservation_covariance and jaxedit.context_templates, cached on disk as jaxedit caches them.

How it differs from EasyEdit's BaseEditor.edit:
- sequential_edit=False edits all cases in one update (EasyEdit's `edit` edits each case alone and
  restores the model after it; its `batch_edit` is the one-update form). ROME edits one case at a time,
  so several cases need sequential_edit=True.
- sequential_edit=True edits one case after another on the edited model, as EasyEdit does; "post" is
  measured right after the case's own edit (EasyEdit's convention) and "post_final" after all edits.
- params are never modified: the edited params are returned, and the editor can edit again from
  the same unedited model.

Metrics: one dict per case, {"case_id", "requested_rewrite", "time", "pre", "post"}, and in "pre" and
"post" (fractions in [0, 1]):
- EasyEdit's metrics, teacher-forced token accuracy (the share of target tokens that are the
  model's argmax given the prompt and the target tokens before them): "rewrite_acc" and
  "rephrase_acc" ([one value]), "locality": {"<key>_output": [argmax tokens at the ground truth's
  positions, per prompt]} and, in "post", "<key>_acc" (the share of those tokens the edit left
  unchanged), "portability": {"<key>_acc": [per prompt]}.
- CounterFact's metrics, a probability comparison (jaxedit.evaluate; p = exp(-mean token NLL)):
  "counterfact_es" (p(target_new) > p(ground_truth) on the rewrite prompt), "counterfact_ps" (on the
  rephrase prompt), "counterfact_ns" (p(ground_truth) > p(target_new) on the locality prompts whose
  ground truth is the case's, as in CounterFact) and the margins "counterfact_em", "counterfact_pm",
  "counterfact_nm"; absent where a case lacks ground_truth or those prompts.
- "metric_meta": which definition each key follows.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxedit import hparams as H
from jaxedit.data import paths
from jaxedit.editing.covariance import preservation_covariance
from jaxedit.editing.editor import edit as jaxedit_edit
from jaxedit.editing.null_space import preservation_null_spaces
from jaxedit.editing.schedule import sequential_edit as jaxedit_sequential_edit
from jaxedit.editing.templates import context_templates
from jaxedit.eval.metrics import evaluate
from jaxedit.eval.token_accuracy import predicted_target_tokens, token_accuracy
from jaxedit.interop import hparams_files
from jaxedit.methods import METHODS
from jaxedit.requests import EditRequest

logger = logging.getLogger(__name__)

# EasyEdit's keyword arguments accepted and not needed here (params are never modified in place)
_ACCEPTED_KWARGS = frozenset({"keep_original_weight"})
METRIC_META = {
    "easyedit": {"keys": ["rewrite_acc", "rephrase_acc", "locality", "portability"],
                 "protocol": "decoder_only_teacher_forcing", "scorer": "token_accuracy"},
    "counterfact": {"keys": ["counterfact_es", "counterfact_ps", "counterfact_ns", "counterfact_em",
                             "counterfact_pm", "counterfact_nm"],
                    "protocol": "probability_comparison", "scorer": "p(new) > p(true), mean token NLL"},
}
_COUNTERFACT = ("es", "ps", "ns", "em", "pm", "nm")


def read_easyedit_hparams(source: str | os.PathLike | Mapping[str, Any], cfg, *,
                          base: H.EditHparams | None = None) -> hparams_files.ImportedHparams:
    """An EasyEdit hparams file (or a mapping of its fields) for the model with cfg.

    EasyEdit files name their method in `alg_name` (required here). Settings a file does not carry
    come from `base`; by default from the model's own preset when jaxedit.hparams knows the model's
    shape (jaxedit.hparams.preset_name_for), else from EditHparams' defaults.
    Raises:
      ValueError for a missing alg_name; hparams_files.UnsupportedHparams for an alg_name other than
      ROME, MEMIT, EMMET or AlphaEdit, and for fields jaxedit does not implement.
    """
    if isinstance(source, Mapping):
        data, name, path = dict(source), "<hparams>", None
    else:
        import yaml

        path = Path(source)
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"{path}: EasyEdit hparams files are .yaml")
        if not path.is_file():
            raise FileNotFoundError(f"no EasyEdit hparams file at {path}")
        data, name = yaml.safe_load(path.read_text()), str(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    alg = data.get("alg_name")
    if alg is None:
        raise ValueError(f"{name}: no alg_name; EasyEdit hparams name their method (ROME, MEMIT, EMMET or AlphaEdit)")
    if base is None and isinstance(alg, str) and alg.lower() in METHODS:
        known = H.preset_name_for(cfg)
        base = H.preset(known, alg.lower()) if known is not None else None
    return hparams_files.hparams_from_dict(data, cfg=cfg, base=base, source=name, fmt="easyedit-yaml", path=path)


@dataclasses.dataclass(frozen=True)
class BaseEditor:
    """EasyEdit's BaseEditor over jaxedit (see the module docstring): hparams, the model, and what
    its edits need (C0 per edited layer, or AlphaEdit's null spaces; context templates)."""

    hparams: H.EditHparams
    cfg: Any
    params: Any
    tokenizer: Any
    covariances: Mapping[int, Any]
    templates: tuple[tuple[str, ...], ...]

    @property
    def alg_name(self) -> str:
        """EasyEdit's name of the method ("ROME", "MEMIT", "EMMET", "AlphaEdit")."""
        return self.hparams.spec.title

    @classmethod
    def from_hparams(cls, hparams: str | os.PathLike | Mapping[str, Any] | H.EditHparams, model, *,
                     covariances: Mapping[int, Any] | None = None, templates=None, corpus: str | None = None,
                     cache_dir: str | os.PathLike | None = None, base: H.EditHparams | None = None,
                     progress: bool = True) -> "BaseEditor":
        """An editor for model = (cfg, params, tokenizer) with an EasyEdit hparams file, a mapping of
        its fields, or an EditHparams.

        covariances / templates: as jaxedit.edit takes them; computed when not given (C0 over
        hparams.covariance, or `corpus` instead of the file's mom2_dataset: EasyEdit's "wikipedia"
        is a hub dataset), cached under cache_dir (default $JAXEDIT_CACHE) in cov/, null_space/ and
        templates/.
        """
        cfg, params, tokenizer = model
        hp = hparams if isinstance(hparams, H.EditHparams) else read_easyedit_hparams(hparams, cfg, base=base).hparams
        hp.check_layers(cfg.num_hidden_layers)
        cache = paths.cache_dir(cache_dir)
        if covariances is None:
            spec = hp.covariance if corpus is None else dataclasses.replace(hp.covariance, corpus=str(corpus))
            covariances = preservation_covariance(params, cfg, tokenizer, hp.layers, spec, cache_dir=cache / "cov",
                                                  progress=progress)
            if hp.spec.uses_null_space:  # AlphaEdit solves in C0's null space: its eigendecomposition, cached
                covariances = preservation_null_spaces(covariances, hp.nullspace_threshold,
                                                       cache_dir=cache / "null_space")
        if templates is None:
            templates = context_templates(params, cfg, tokenizer, hp.templates, cache_dir=cache)
        return cls(hparams=hp, cfg=cfg, params=params, tokenizer=tokenizer, covariances=dict(covariances),
                   templates=tuple(tuple(g) for g in templates))

    def edit(self, prompts: str | Sequence[str], target_new: str | Sequence[str],
             ground_truth: str | Sequence[str | None] | None = None, target_neg=None,
             rephrase_prompts: str | Sequence[str | None] | None = None,
             locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
             portability_inputs: Mapping[str, Mapping[str, Any]] | None = None,
             sequential_edit: bool = False, verbose: bool = True, subject: str | Sequence[str] | None = None,
             test_generation: bool = False, eval_metric: str = "token_em", **kwargs):
        """Edits the cases EasyEdit's arguments describe. Returns (metrics, edited params).

        Arguments as EasyEdit's BaseEditor.edit, with one entry per prompt in every list (a single
        string stands for a one-prompt call); `subject` is required (the editors read keys at its
        last token); locality_inputs / portability_inputs are {key: {"prompt": [...], "ground_truth":
        [...]}} with one entry per prompt (a string, a list of strings, or None for none).
        Raises:
          ValueError naming the argument: lengths that do not match the prompts, a missing subject or
          one not in its prompt, malformed locality / portability inputs; TypeError for arguments
          EasyEdit has and jaxedit does not implement (target_neg, test_generation, eval_metric other
          than token accuracy, unknown keywords).
        """
        unknown = sorted(set(kwargs) - _ACCEPTED_KWARGS)
        if unknown:
            raise TypeError(f"edit() got EasyEdit argument(s) the jaxedit front door does not implement: {unknown}")
        if target_neg is not None:
            raise TypeError("target_neg is not implemented: ROME, MEMIT, EMMET and AlphaEdit edit towards target_new")
        if test_generation:
            raise TypeError("test_generation is not implemented here: use jaxedit.evaluate(..., with_generation=True)")
        if eval_metric not in ("token_em", "exact match"):
            raise TypeError(f"eval_metric={eval_metric!r} is not implemented: token accuracy only")
        cases = easyedit_cases(prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
                               portability_inputs)
        requests = [c.request for c in cases]
        if not sequential_edit and len(requests) > 1 and self.hparams.spec.max_requests == 1:
            raise ValueError(f"{self.hparams.spec.title} edits one case at a time: pass sequential_edit=True "
                             f"for {len(requests)} cases, or call edit once per case")
        pre = self._scores(self.params, cases)
        post_now: list[dict] = []
        seconds: list[float] = []

        def after_case(index, params, batch, report):
            post_now.extend(self._scores(params, cases[index:index + 1]))
            seconds.append(sum(report.seconds.values()))

        if sequential_edit:
            edited, _ = jaxedit_sequential_edit(self.params, self.cfg, self.tokenizer, requests, self.hparams,
                                                covariances=self.covariances, templates=self.templates,
                                                after_batch=after_case, progress=verbose)
            final = self._scores(edited, cases)
        else:
            edited, report = jaxedit_edit(self.params, self.cfg, self.tokenizer, requests, self.hparams,
                                          covariances=self.covariances, templates=self.templates)
            post_now, final = self._scores(edited, cases), None
            seconds = [sum(report.seconds.values())] * len(cases)
        metrics = []
        for i, case in enumerate(cases):
            row = {"case_id": i, "requested_rewrite": case.record, "time": seconds[i], "pre": pre[i],
                   "post": _with_locality_acc(post_now[i], pre[i])}
            if final is not None:
                row["post_final"] = _with_locality_acc(final[i], pre[i])
            metrics.append(row)
            if verbose:
                logger.info("%d editing: %s -> %s: %s", i, case.record["prompt"], case.record["target_new"],
                            {k: row["post"][k] for k in ("rewrite_acc", "counterfact_es") if k in row["post"]})
        return metrics, edited

    def _scores(self, params, cases: Sequence["EasyEditCase"]) -> list[dict]:
        """Both metric definitions of each case on params ("pre"/"post" dicts without locality accuracy)."""
        pairs, owners = [], []  # every (prompt, target) pair scored by token accuracy, and where it goes
        for c, case in enumerate(cases):
            r = case.record
            pairs.append((r["prompt"], r["target_new"]))
            owners.append((c, "rewrite_acc", None))
            if r.get("rephrase_prompt") is not None:
                pairs.append((r["rephrase_prompt"], r["target_new"]))
                owners.append((c, "rephrase_acc", None))
            for section in ("locality", "portability"):
                for key, item in r[section].items():
                    pairs += list(zip(item["prompt"], item["ground_truth"]))
                    owners += [(c, section, key)] * len(item["prompt"])
        out = [{"locality": {}, "portability": {}, "metric_meta": METRIC_META} for _ in cases]
        for (c, what, key), (predicted, target) in zip(owners, predicted_target_tokens(
                params, self.cfg, self.tokenizer, pairs)):
            if what == "locality":
                out[c]["locality"].setdefault(f"{key}_output", []).append(predicted.tolist())
            elif what == "portability":
                out[c]["portability"].setdefault(f"{key}_acc", []).append(token_accuracy(predicted, target))
            else:
                out[c].setdefault(what, []).append(token_accuracy(predicted, target))
        scored = [c for c, case in enumerate(cases) if case.request.target_true is not None]
        if scored:
            result = evaluate(params, self.cfg, self.tokenizer, [cases[c].request for c in scored], progress=False)
            for c, m in zip(scored, result.cases):
                for name in _COUNTERFACT:
                    value = getattr(m, name)
                    if not np.isnan(value):
                        out[c][f"counterfact_{name}"] = value / 100.0  # jaxedit's percent as EasyEdit's fraction
        return out


def _with_locality_acc(post: dict, pre: dict) -> dict:
    """post with EasyEdit's "<key>_acc": per locality prompt, the share of argmax tokens the edit left as they were."""
    locality = dict(post["locality"])
    for name, outputs in post["locality"].items():
        if name.endswith("_output"):
            before = pre["locality"][name]
            locality[name[:-len("_output")] + "_acc"] = [float(np.mean(np.equal(a, b))) for a, b in zip(before, outputs)]
    return {**post, "locality": locality}


@dataclasses.dataclass(frozen=True)
class EasyEditCase:
    """One case from EasyEdit's arguments: its EasyEdit request record, and the jaxedit EditRequest."""

    record: dict
    request: EditRequest


def _per_prompt(name: str, value, n: int, *, optional: bool = True) -> list:
    """value as a list of one entry per prompt (a string stands for [string] when n == 1)."""
    if value is None:
        if not optional:
            raise ValueError(f"{name} is required: one per prompt")
        return [None] * n
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompt(s): give one per prompt")
    for v in value:
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{name} must hold strings, got {type(v).__name__} {v!r}")
    return list(value)


def _inputs(name: str, inputs, n: int) -> list[dict]:
    """EasyEdit's {key: {"prompt": [...], "ground_truth": [...]}} as one {key: {"prompt": [..], "ground_truth": [..]}}
    per case (each case's prompts as a list; cases whose prompt is None left out)."""
    per_case: list[dict] = [{} for _ in range(n)]
    if inputs is None:
        return per_case
    if not isinstance(inputs, Mapping):
        raise ValueError(f"{name} must be a dict {{key: {{'prompt': [...], 'ground_truth': [...]}}}}, "
                         f"got {type(inputs).__name__}")
    for key, item in inputs.items():
        if not isinstance(item, Mapping) or set(item) != {"prompt", "ground_truth"}:
            raise ValueError(f"{name}[{key!r}] must be {{'prompt': [...], 'ground_truth': [...]}}, got {item!r}")
        prompts, truths = item["prompt"], item["ground_truth"]
        if isinstance(prompts, str):
            prompts, truths = [prompts], [truths]
        for what, v in (("prompt", prompts), ("ground_truth", truths)):
            if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != n:
                size = len(v) if isinstance(v, Sequence) and not isinstance(v, str) else type(v).__name__
                raise ValueError(f"{name}[{key!r}][{what!r}] has {size} entries for {n} prompt(s): "
                                 "one entry per edit")
        for i, (p, t) in enumerate(zip(prompts, truths)):
            if p is None:
                continue
            ps, ts = ([p], [t]) if isinstance(p, str) else (list(p), t if not isinstance(t, str) else [t])
            if len(ps) != len(ts) or not all(isinstance(x, str) and x.strip() for x in (*ps, *ts)):
                raise ValueError(f"{name}[{key!r}] entry {i}: prompts {ps!r} and ground truths {ts!r} must be "
                                 "non-empty strings, as many of each")
            per_case[i][key] = {"prompt": ps, "ground_truth": ts}
    return per_case


def easyedit_cases(prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
                   locality_inputs=None, portability_inputs=None) -> list[EasyEditCase]:
    """EasyEdit's edit arguments as cases (EasyEdit's request records and jaxedit EditRequests), checked:
    every list has one entry per prompt, each subject is in its prompt."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty string or list of strings")
    n = len(prompts)
    prompts = _per_prompt("prompts", prompts, n, optional=False)
    target_new = _per_prompt("target_new", target_new, n, optional=False)
    if subject is None:
        raise ValueError("subject is required (one per prompt): the editors read keys at the subject's last token")
    subject = _per_prompt("subject", subject, n, optional=False)
    ground_truth = _per_prompt("ground_truth", ground_truth, n)
    rephrase = _per_prompt("rephrase_prompts", rephrase_prompts, n)
    locality = _inputs("locality_inputs", locality_inputs, n)
    portability = _inputs("portability_inputs", portability_inputs, n)
    for name, values in (("prompts", prompts), ("target_new", target_new), ("subject", subject)):
        for i, v in enumerate(values):
            if v is None or not v.strip():
                raise ValueError(f"{name}[{i}] is empty")
    cases = []
    for i in range(n):
        record = {"prompt": prompts[i], "target_new": target_new[i], "ground_truth": ground_truth[i],
                  "subject": subject[i], "portability": portability[i], "locality": locality[i]}
        if rephrase[i] is not None:
            record["rephrase_prompt"] = rephrase[i]
        truth = ground_truth[i]
        # CounterFact's NS: neighbourhood prompts whose true object is this case's (CounterFact's own layout)
        neighbours = tuple(p for item in locality[i].values() for p, t in zip(item["prompt"], item["ground_truth"])
                           if truth is not None and t.strip() == truth.strip())
        if subject[i] not in prompts[i]:
            raise ValueError(f"subject[{i}] {subject[i]!r} is not in prompts[{i}] {prompts[i]!r}")
        request = EditRequest.from_filled(prompts[i], subject[i], target_new[i], target_true=truth, case_id=i,
                                          paraphrase_prompts=() if rephrase[i] is None else (rephrase[i],),
                                          neighborhood_prompts=neighbours)
        cases.append(EasyEditCase(record=record, request=request))
    return cases


def summary(metrics: Sequence[Mapping[str, Any]]) -> dict:
    """Means over cases of every accuracy and CounterFact metric, per phase, as EasyEdit's summary_metrics
    prints them ({"pre": {...}, "post": {...}}, with "locality"/"portability" per key)."""
    out: dict[str, dict] = {}
    for phase in ("pre", "post", "post_final"):
        rows = [m[phase] for m in metrics if phase in m]
        if not rows:
            continue
        means: dict[str, Any] = {}
        names = sorted({k for r in rows for k in r if k.endswith("_acc") or k.startswith("counterfact_")})
        for k in names:
            means[k] = float(np.mean([np.mean(r[k]) for r in rows if k in r]))
        for section in ("locality", "portability"):
            keys = sorted({k for r in rows for k in r[section] if k.endswith("_acc")})
            if keys:
                means[section] = {k: float(np.mean([np.mean(r[section][k]) for r in rows if k in r[section]]))
                                  for k in keys}
        out[phase] = means
    return out
