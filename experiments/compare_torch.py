"""jaxedit against a compact PyTorch baseline on the same model, requests, hparams, templates and C0.

The baseline (baselines.torch_reference) works the way the reference implementations do: forward hooks
for keys, one request at a time for the value optimisation (torch.optim.Adam, a hook adding delta at
the layer output), and an F x F solve in float64 (MEMIT: torch.linalg.solve; EMMET: explicit C^-1).
It runs on transformers' LlamaForCausalLM holding our float32 weights. Printed:

* agreement: relative differences ||a - b|| / ||b|| (b = PyTorch) of the keys, the value vectors
  (init, delta, target), the residuals, and Delta W per method, end to end and from identical inputs
  (the PyTorch solve on jaxedit's keys and residuals), and ES/PS/NS/S from jaxedit's evaluator on both
  edited models, with the number of cases whose ES differs;
* seconds per stage for both, with their ratio (PyTorch / jaxedit). jaxedit's times are warm (the
  value optimisation is compiled ahead of time, the keys/solve stages run once before timing); the
  compile seconds are reported apart. The values and keys of MEMIT and EMMET are the same computation
  (same layer, site and value hparams), so both implementations compute them once and share them.

PyTorch's intra-op threads default to 1: on a small machine shared with other busy processes its
OpenMP barriers make multi-threaded small matmuls an order of magnitude slower than one thread (see
benchmarks/forward_speed.py); --torch_threads changes it.

    python -m experiments.compare_torch --n=8 --methods=memit,emmet [--json_out=runs/compare_torch.json]
    python -m experiments.compare_torch --hparams_file=EasyEdit/hparams/MEMIT/smollm2.yaml --n=8
    python -m experiments.compare_torch --hparams_file=... --case_ids=381,... --edited_checkpoint=edited_hf_folder
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from benchmarks.stages import jaxedit_edit, jaxedit_values
from jaxedit.data import paths
from jaxedit.editing import editor, pm
from jaxedit.eval import metrics
from jaxedit.eval import tables
from jaxedit.hparams import CovarianceHparams, EditHparams
from jaxedit.editing.keys import outputs_at_subject
from jaxedit.editing.templates import flat



def rel(got, want) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = np.linalg.norm(want)
    num = np.linalg.norm(got - want)
    return float(num / den) if den > 0 else float(num)


# ---------------------------------------------------------------------- comparison
@dataclasses.dataclass
class Comparison:
    agreement: dict        # name -> relative difference or count
    metrics: dict          # row name -> metrics.Aggregate
    es_mismatch: dict      # method -> number of cases whose ES differs between the two edits
    seconds: dict          # stage -> {"torch": s, "jaxedit": s}
    compile_seconds: dict  # jaxedit stage -> compile s
    steps: dict            # "torch"/"jaxedit" -> list of Adam updates per request
    meta: dict

    def as_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["metrics"] = {k: v.as_dict() for k, v in self.metrics.items()}
        return out


def compare(params, cfg, tokenizer, requests: Sequence, hps: Mapping[str, EditHparams], covariances,
            templates, *, torch_threads: int | None = 1, warmup: bool = True, evaluate: bool = True,
            log=print) -> Comparison:
    """Runs both implementations on the same inputs and measures their agreement and speed.

    Args:
      hps: {"memit": EditHparams, "emmet": EditHparams}; all must share layers and value hparams
        (their values and keys are computed once).
      covariances: {layer: C0} for the edited layers (unscaled, as jaxedit.editing.covariance makes them).
      templates: context template groups.
      torch_threads: torch.set_num_threads for the baseline (None: leave as is).
      evaluate: also score ES/PS/NS with jaxedit's evaluator (needs target_true and prompts).
    """
    import torch

    from baselines import torch_reference as tb

    methods = list(hps)
    first = hps[methods[0]]
    for m, hp in hps.items():
        if hp.method not in ("memit", "emmet"):
            raise ValueError(f"compare supports MEMIT and EMMET, got {hp.method!r}")
        if hp.layers != first.layers or hp.value != first.value:
            raise ValueError("all methods compared in one run must share layers and value hparams")
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    requests = tuple(requests)
    covariances = {l: np.asarray(covariances[l], np.float32) for l in first.layers}
    model = tb.torch_model(cfg, params)
    z_layer = first.layers[-1]
    seconds: dict = {}
    compile_s: dict = {}
    agree: dict = {}

    # values (shared by the methods)
    log(f"jaxedit: value optimisation of {len(requests)} requests ...")
    vj, seconds_j, compile_s["values"] = jaxedit_values(params, cfg, tokenizer, requests, first, templates, warmup)
    log(f"  {seconds_j:.1f}s (compile {compile_s['values']:.1f}s)")
    log(f"PyTorch: value optimisation of {len(requests)} requests, one at a time ...")
    t0 = time.perf_counter()
    vt = tb.values(model, tokenizer, requests, list(flat(templates)), z_layer, first.value)
    seconds["values"] = {"torch": time.perf_counter() - t0, "jaxedit": seconds_j}
    log(f"  {seconds['values']['torch']:.1f}s")
    agree["value init"] = rel(vj.init, vt.init)
    agree["value delta"] = rel(vj.delta, vt.delta)
    agree["value target"] = rel(vj.target, vt.target)
    agree["value loss (max abs diff)"] = float(np.max(np.abs(np.asarray(vj.loss) - vt.loss)))
    agree["value steps equal (cases)"] = int(np.sum(np.asarray(vj.steps) == vt.steps))
    steps = {"torch": vt.steps.tolist(), "jaxedit": np.asarray(vj.steps).tolist()}

    # current outputs for the identical-input solve check
    _, cur = outputs_at_subject(params, cfg, tokenizer, requests, z_layer)
    rows = {}
    unedited = metrics.evaluate(params, cfg, tokenizer, requests).aggregate if evaluate else None
    if evaluate:
        rows["unedited"] = unedited
    es_mismatch = {}
    for m in methods:
        hp = hps[m]
        log(f"{m}: keys + solve (jaxedit, warm) ...")
        new_j, rep, compile_s[f"keys+solve[{m}]"] = jaxedit_edit(params, cfg, tokenizer, requests, hp, covariances,
                                                                 templates, vj, warmup)
        log(f"{m}: keys + solve (PyTorch) ...")
        te = tb.edit(model, tokenizer, requests, hp, covariances=covariances, templates=templates, given_values=vt)
        seconds[f"keys[{m}]"] = {"torch": te.seconds["keys"], "jaxedit": rep.seconds["keys"]}
        seconds[f"solve[{m}]"] = {"torch": te.seconds["solve"], "jaxedit": rep.seconds["solve"]}
        seconds[f"total[{m}]"] = {k: seconds["values"][k] + seconds[f"keys[{m}]"][k] + seconds[f"solve[{m}]"][k]
                                  for k in ("torch", "jaxedit")}
        for i, layer in enumerate(hp.layers):
            Kj = np.asarray(rep.keys[i])                          # (F, n)
            agree[f"keys L{layer}"] = rel(Kj.T, te.keys[layer])
            dWj = np.asarray(new_j["layers"]["down_proj"][layer]) - np.asarray(params["layers"]["down_proj"][layer])
            agree[f"Delta W {m} L{layer}"] = rel(dWj, te.deltas[layer])
        # the solve alone: PyTorch's formula on jaxedit's own keys and residuals (single layer)
        if len(hp.layers) == 1:
            layer = hp.layers[0]
            Kj = np.asarray(rep.keys[0], np.float64)
            Rj = (np.asarray(vj.target, np.float64) - np.asarray(cur, np.float64)).T
            C0 = covariances[layer]
            ref = (tb.memit_solve(C0, Kj, Rj, hp.mom2_update_weight) if m == "memit"
                   else tb.emmet_solve(C0, Kj, Rj, hp.mom2_update_weight, hp.emmet_lambda)).numpy()
            direct = editor.layer_update(hp, pm.factor_preservation(jnp.asarray(C0)), jnp.asarray(Kj, jnp.float32),
                                         jnp.asarray(Rj, jnp.float32))[0]
            agree[f"Delta W {m} (same K, R)"] = rel(np.asarray(direct), ref)
        if evaluate:
            new_t = params
            for layer, dW in te.deltas.items():
                new_t = editor.add_to_down_proj(new_t, layer, jnp.asarray(dW))
            ej = metrics.evaluate(new_j, cfg, tokenizer, requests)
            et = metrics.evaluate(new_t, cfg, tokenizer, requests)
            rows[f"{m} jaxedit"] = ej.aggregate
            rows[f"{m} PyTorch"] = et.aggregate
            es_mismatch[m] = int(sum(a.es != b.es for a, b in zip(ej.cases, et.cases)))
    meta = {"n": len(requests), "layers": list(first.layers), "methods": methods,
            "torch_threads": torch.get_num_threads(), "case_ids": [r.case_id for r in requests],
            "v_num_grad_steps": first.value.v_num_grad_steps,
            "mom2_update_weight": {m: hps[m].mom2_update_weight for m in methods}}
    return Comparison(agreement=agree, metrics=rows, es_mismatch=es_mismatch, seconds=seconds,
                      compile_seconds=compile_s, steps=steps, meta=meta)


def format_report(c: Comparison) -> str:
    lines = ["Agreement (relative difference ||jaxedit - PyTorch|| / ||PyTorch||)", "-" * 60]
    for k, v in c.agreement.items():
        lines.append(f"{k:<34} {v:>12.3g}" if isinstance(v, float) else f"{k:<34} {v:>12}")
    lines.append(f"{'Adam updates per request (PyTorch)':<34} {c.steps['torch']}")
    lines.append(f"{'Adam updates per request (jaxedit)':<34} {c.steps['jaxedit']}")
    if c.metrics:
        lines += ["", tables.format_table(c.metrics)]
        for m, k in c.es_mismatch.items():
            lines.append(f"{m}: cases whose ES differs between the two edited models: {k} of {c.meta['n']}")
    lines += ["", f"Seconds per stage (n={c.meta['n']}, PyTorch threads={c.meta['torch_threads']}; "
              "jaxedit warm)", f"{'stage':<16} {'PyTorch':>10} {'jaxedit':>10} {'ratio':>8}", "-" * 47]
    for stage, s in c.seconds.items():
        ratio = s["torch"] / s["jaxedit"] if s["jaxedit"] > 0 else float("inf")
        lines.append(f"{stage:<16} {s['torch']:>10.2f} {s['jaxedit']:>10.2f} {ratio:>7.1f}x")
    lines.append("jaxedit compile seconds (not in the table): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in c.compile_seconds.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def _hparams(F, cfg):
    """{method: EditHparams} from --hparams_file (an EasyEdit/reference file) or the preset."""
    from jaxedit import hparams
    from jaxedit.interop import hparams_files

    if F.hparams_file:
        method = hparams_files.import_hparams(F.hparams_file, cfg=cfg).hparams.method
        hp = hparams_files.read_hparams(F.hparams_file, cfg=cfg, base=hparams.preset(F.preset, method))
        pairs = [(method, hp)]
    else:
        pairs = [(m, hparams.preset(F.preset, m)) for m in F.methods]
    out = {}
    for m, hp in pairs:
        changes = {}
        if F.layer is not None:
            changes["layers"] = (F.layer,)
        if F.v_num_grad_steps is not None:
            changes["value"] = dataclasses.replace(hp.value, v_num_grad_steps=F.v_num_grad_steps)
        out[m] = hp.replace(**changes) if changes else hp
    return out


def main(argv):
    del argv
    from absl import flags

    from jaxedit.data import counterfact
    from jaxedit.editing import covariance, templates as jtemplates
    from jaxedit.interop import checkpoints
    from llama3_flax import checkpoint

    F = flags.FLAGS
    t0 = time.perf_counter()
    cfg, params, tok = checkpoint.load_model(F.model)
    if F.case_ids:
        requests = counterfact.load_counterfact(F.requests, ids=[int(i) for i in F.case_ids])
    else:
        requests = counterfact.load_counterfact(F.requests, n=F.n, seed=F.seed)
    hps = _hparams(F, cfg)
    first = next(iter(hps.values()))
    cache = Path(F.cache_dir)
    t1 = time.perf_counter()
    g = jtemplates.context_templates(params, cfg, tok, first.templates, cache_dir=cache)
    t_templates = time.perf_counter() - t1
    t1 = time.perf_counter()
    corpus = F.corpus or str(counterfact.data_dir() / "corpus" / "wikitext-103-valid.tokens")
    spec = CovarianceHparams(corpus=corpus, n_samples=F.cov_samples, max_length=F.cov_max_length)
    C = covariance.preservation_covariance(params, cfg, tok, list(first.layers), spec, cache_dir=cache,
                                           progress=False)
    t_cov = time.perf_counter() - t1
    print(f"model, requests, templates ({t_templates:.1f}s) and C0 ({t_cov:.1f}s, possibly cached) ready "
          f"in {time.perf_counter() - t0:.1f}s")
    if F.edited_checkpoint:
        # a checkpoint a PyTorch tool saved after editing these requests, against jaxedit's edit of them
        new, report = editor.edit(params, cfg, tok, requests, first, covariances=C, templates=g)
        print(report.summary())
        c = checkpoints.compare_checkpoint(params, cfg, F.edited_checkpoint, ours=new, tokenizer=tok, requests=requests)
        print(c.format())
        return
    c = compare(params, cfg, tok, requests, hps, C, g, torch_threads=F.torch_threads, warmup=F.warmup)
    c.meta.update(templates_seconds=t_templates, covariance_seconds=t_cov, model=F.model, seed=F.seed)
    print()
    print(format_report(c))
    if F.json_out:
        out = Path(F.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(c.as_json(), indent=1, default=float))
        print(f"written {out}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", "smollm2", "'smollm2', a .gguf file or an HF folder")
    flags.DEFINE_string("preset", "smollm2-135m", "jaxedit.hparams preset name")
    flags.DEFINE_string("requests", "edit", "CounterFact source (see jaxedit.data.counterfact.load_requests)")
    flags.DEFINE_integer("n", 8, "number of requests")
    flags.DEFINE_integer("seed", 0, "request sampling seed")
    flags.DEFINE_list("case_ids", None, "CounterFact case ids (instead of --n/--seed)")
    flags.DEFINE_string("hparams_file", None, "an EasyEdit .yaml or reference .json hparams file (overrides "
                        "--methods; fields the file lacks come from --preset)")
    flags.DEFINE_string("edited_checkpoint", None, "an HF folder a PyTorch tool saved after editing the requests: "
                        "compare it with the original and with jaxedit's edit instead of running the baseline")
    flags.DEFINE_list("methods", ["memit", "emmet"], "memit and/or emmet")
    flags.DEFINE_integer("layer", None, "edit this layer instead of the preset's")
    flags.DEFINE_integer("v_num_grad_steps", None, "override the value optimisation's step count")
    flags.DEFINE_string("corpus", None, "C0 corpus (default: the shared WikiText-103 validation split)")
    flags.DEFINE_integer("cov_samples", 200, "C0 samples")
    flags.DEFINE_integer("cov_max_length", 128, "C0 tokens per sample")
    flags.DEFINE_string("cache_dir", str(paths.cache_dir()), "templates and C0 cache ($JAXEDIT_CACHE)")
    flags.DEFINE_integer("torch_threads", 1, "torch.set_num_threads (0: torch's default)")
    flags.DEFINE_bool("warmup", True, "time jaxedit warm (compile reported apart)")
    flags.DEFINE_string("json_out", None, "write the comparison as JSON here")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
