"""Consecutive ROME single edits on SmolLM2-135M: seconds per edit, first run and second run.

Each run is a fresh process that loads the model, C0 and context templates (cached on disk, not
timed) and then makes --edits single ROME edits of CounterFact cases, each on the unedited model, as
a user of the command line or the layer sweep does. A run's first edits pay for compiling the value
optimisation; the second run finds the compiled programs in the persistent compilation cache
(jaxedit.compilation_cache; the first run fills it). With --before TREE the same runs are made with
the code of another checkout of this repository (e.g. `git worktree add /tmp/before <rev>`) under
its own defaults, for a before/after table.

With --torch, the PyTorch reference makes the same edits' keys and values in the same run.

    python -m benchmarks.rome_speed [--edits 8] [--before /tmp/before] [--torch]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["ROME_SPEED_TREE"])
import jax
import jaxedit
from llama3_flax import checkpoint

edits, cache = int(sys.argv[1]), sys.argv[2]
cfg, params, tok = checkpoint.load_model("smollm2")
if hasattr(jaxedit, "preservation_covariance"):  # this tree's API
    from jaxedit import compilation_cache
    compilation_cache.enable()
    hp = jaxedit.preset("smollm2-135m", "rome")
    C0 = jaxedit.preservation_covariance(params, cfg, tok, hp.layers, hp.covariance, cache_dir=cache + "/cov",
                                         progress=False)
    groups = jaxedit.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    cases = jaxedit.load_counterfact("edit", n=edits, seed=0)
    edit = jaxedit.edit
    from jaxedit.editing import values
else:  # the flat layout (jaxedit.editor, jaxedit.covariance, ...), no persistent cache by default
    from jaxedit import counterfact, covariance, editor, hparams, templates, values
    hp = hparams.preset("smollm2-135m", "rome")
    corpus = counterfact.data_dir() / "corpus" / hp.covariance.corpus
    C0 = covariance.preservation_covariance(params, cfg, tok, corpus, list(hp.layers),
                                            n_samples=hp.covariance.n_samples, max_length=hp.covariance.max_length,
                                            batch_size=8, cache_dir=cache + "/cov", progress=False)
    groups = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    cases = counterfact.load_counterfact("edit", n=edits, seed=0)
    edit = editor.edit
rows = []
for case in cases:
    compiled = values.optimise_values._cache_size()
    t0 = time.perf_counter()
    new, report = edit(params, cfg, tok, [case], hp, covariances=C0, templates=groups)
    jax.block_until_ready(new["layers"]["down_proj"])
    rows.append({"seconds": time.perf_counter() - t0, "values": report.seconds["values"],
                 "steps": int(report.values.steps[0]),
                 "compiled": values.optimise_values._cache_size() - compiled})
print("ROWS " + json.dumps(rows))
"""


TORCH_CHILD = r"""
import json, sys, time
import jaxedit
from baselines import torch_reference as tb
from jaxedit.editing.templates import flat
from llama3_flax import checkpoint

edits, cache = int(sys.argv[1]), sys.argv[2]
cfg, params, tok = checkpoint.load_model("smollm2")
hp = jaxedit.preset("smollm2-135m", "rome")
groups = jaxedit.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
cases = jaxedit.load_counterfact("edit", n=edits, seed=0)
model = tb.torch_model(cfg, params)
layer = hp.layers[-1]
rows = []
for case in cases:
    t0 = time.perf_counter()
    tb.keys(model, tok, [case], groups, layer)
    vals = tb.values(model, tok, [case], list(flat(groups)), layer, hp.value)
    rows.append({"seconds": time.perf_counter() - t0, "steps": int(vals.steps[0]), "compiled": 0})
print("ROWS " + json.dumps(rows))
"""


def run_child(tree: Path, edits: int, cache: Path, jit_cache: Path, script: str = CHILD) -> list[dict]:
    env = dict(os.environ, ROME_SPEED_TREE=str(tree), JAXEDIT_JIT_CACHE=str(jit_cache))
    out = subprocess.run([sys.executable, "-c", script, str(edits), str(cache)], env=env, cwd=tree,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark run in {tree} failed:\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("ROWS "))
    return json.loads(line[5:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--before", default=None, help="another checkout to time under its own defaults")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch reference (baselines.torch_reference) on the same cases: "
                             "ROME's keys and values, one request at a time (its rank-one solve, milliseconds, "
                             "is left out)")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    trees = ([("before", Path(args.before).resolve())] if args.before else []) + [("after", here)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"  # C0 and templates, shared: not what is timed
        for name, tree in trees:
            jit_cache = Path(tmp) / f"jit-{name}"
            for run in ("first run", "second run"):
                print(f"{name}, {run} ...", file=sys.stderr, flush=True)
                results[(name, run)] = run_child(tree, args.edits, cache, jit_cache)
        if args.torch:
            print("PyTorch reference ...", file=sys.stderr, flush=True)
            results[("PyTorch reference", "keys + values")] = run_child(here, args.edits, cache, Path(tmp) / "jit",
                                                                         script=TORCH_CHILD)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    header = ["code", "run"] + [f"edit {i + 1}" for i in range(args.edits)] + ["total s", "programs compiled"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (name, run), rows in results.items():
        cells = [f"{r['seconds']:.1f}" for r in rows]
        print(f"| {name} | {run} | " + " | ".join(cells)
              + f" | {sum(r['seconds'] for r in rows):.1f} | {sum(r['compiled'] for r in rows)} |")
    if args.torch:
        torch_total = sum(r["seconds"] for r in results[("PyTorch reference", "keys + values")])
        for (name, run), rows in results.items():
            if name != "PyTorch reference":
                print(f"PyTorch reference / {name}, {run}: {torch_total / sum(r['seconds'] for r in rows):.2f}x")
        print("loss evaluations per edit (jaxedit after / PyTorch): "
              + ", ".join(f"{a['steps'] + 1}/{b['steps'] + 1}" for a, b in
                          zip(results[("after", "second run")], results[("PyTorch reference", "keys + values")])))
    return {f"{k[0]}/{k[1]}": v for k, v in results.items()}


if __name__ == "__main__":
    main()
