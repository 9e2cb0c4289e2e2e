"""The `jaxedit` command: edit your own facts in a model and write it out, or evaluate a model on
CounterFact.

  jaxedit edit --model smollm2 --facts facts.jsonl --method memit --out edited/ [--format hf|gguf]
  jaxedit evaluate --model edited/ --cases edit --n 64

MODEL is "smollm2" (the offline SmolLM2-135M-Instruct), an HF folder, a .gguf file, or a hub id
("HuggingFaceTB/SmolLM2-135M-Instruct", resolved through the local hub cache; HF_HOME and
HF_HUB_OFFLINE are honoured). Facts files: see jaxedit.data.facts. Caches (C0, context templates,
compiled programs) live in $JAXEDIT_CACHE (default ~/.cache/jaxedit); $JAXEDIT_JIT_CACHE or
--jit_cache moves or disables the compiled-program cache. Nothing is written to --out unless the whole
run succeeds; Ctrl-C leaves nothing behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

PRESETS = ("smollm2-135m", "llama3-8b")
FORMATS = ("hf", "gguf")
GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0")


class UsageError(ValueError):
    """A command line that cannot run (the message says what is wrong)."""


# ------------------------------------------------------------------------------------ arguments
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxedit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit facts in a model and write the edited model")
    e.add_argument("--model", default="smollm2", help="'smollm2', an HF folder, a .gguf file or a hub id")
    e.add_argument("--facts", required=True, help="a .jsonl, .json or .csv file of facts (jaxedit.data.facts)")
    e.add_argument("--method", required=True, help="rome, memit or emmet")
    e.add_argument("--layers", default=None, help="comma-separated layers to edit (default: the preset's)")
    e.add_argument("--hparams", default="auto", help=f"a preset ({', '.join(PRESETS)}; 'auto' picks by "
                   "model), or an EasyEdit .yaml / reference .json hparams file")
    e.add_argument("--batch_size", type=int, default=None, help="MEMIT/EMMET: facts per update (default: "
                   "all in one batch); ROME always edits one fact at a time")
    e.add_argument("--out", required=True, help="where the edited model goes (must not exist)")
    e.add_argument("--format", default="hf", choices=FORMATS, help="hf (a folder for transformers) or gguf")
    e.add_argument("--gguf_dtype", default="float16", help="tensor type of a GGUF: float32, float16, "
                   "bfloat16 or q8_0")
    e.add_argument("--corpus", default=None, help="C0 corpus (default: the preset's, in $JAXEDIT_DATA/corpus)")
    e.add_argument("--cov_samples", type=int, default=None, help="override the preset's C0 sample count")
    e.add_argument("--report", default=None, help="also write the before/after numbers as JSON here")
    e.add_argument("--jit_cache", default=None, help="compiled-program cache folder, or 'off'")
    e.add_argument("--max_new_tokens", type=int, default=8, help="length of the greedy continuations shown")

    v = sub.add_parser("evaluate", help="CounterFact ES/PS/NS/S of a model")
    v.add_argument("--model", default="smollm2", help="'smollm2', an HF folder, a .gguf file or a hub id")
    v.add_argument("--cases", default="edit", help="CounterFact source: 'edit'/'train' ($JAXEDIT_DATA), a "
                   "local .json/.jsonl file, or 'original'")
    v.add_argument("--n", type=int, default=None, help="evaluate n cases drawn with --seed (default: all)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch_size", type=int, default=16, help="rows per scoring call")
    v.add_argument("--json", default=None, help="also write the aggregate and per-case metrics as JSON here")
    v.add_argument("--jit_cache", default=None, help="compiled-program cache folder, or 'off'")
    return parser


def _layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None


def resolve_hparams(choice: str, method: str, cfg, *, layers=None, corpus=None, cov_samples=None):
    """EditHparams from a preset name ('auto': jaxedit.hparams.preset_for, the preset of the model's
    shape) or a hparams file, with the command line's overrides."""
    from jaxedit import hparams as H
    from jaxedit.interop import hparams_files

    if choice == "auto":  # the model's own preset, or a borrowed one with a logged warning naming it
        hp = H.preset_for(cfg, method)
    elif choice in PRESETS:
        hp = H.preset(choice, method)
    elif Path(choice).suffix.lower() in (".yaml", ".yml", ".json"):
        hp = hparams_files.read_hparams(choice, method=method, cfg=cfg, base=H.preset("llama3-8b", method))
    else:
        raise UsageError(f"--hparams {choice!r} is neither a preset ({', '.join(PRESETS)}, auto) nor a "
                         ".yaml/.json hparams file")
    if layers is not None:
        hp = hp.replace(layers=layers)
    if corpus is not None or cov_samples is not None:
        hp = hp.replace(covariance=dataclasses.replace(
            hp.covariance, corpus=hp.covariance.corpus if corpus is None else str(corpus),
            n_samples=hp.covariance.n_samples if cov_samples is None else cov_samples))
    hp.check_layers(cfg.num_hidden_layers)
    return hp


# --------------------------------------------------------------------------------- fact table
@dataclasses.dataclass(frozen=True)
class FactState:
    """One fact as a model sees it: per-token probabilities of the targets (exp of the mean token
    NLL, the CounterFact convention) and a greedy continuation of the prompt."""

    p_new: float
    p_true: float | None
    continuation: str


def fact_states(params, cfg, tokenizer, facts, max_new_tokens: int) -> list[FactState]:
    from jaxedit.eval import scoring
    from llama3_flax import generate

    pairs = [(f.filled_prompt, f.target_new) for f in facts]
    pairs += [(f.filled_prompt, f.target_true) for f in facts if f.target_true is not None]
    nll = scoring.score_pairs(params, cfg, tokenizer, pairs, progress=False)
    texts = generate.generate_text(params, cfg, tokenizer, [f.filled_prompt for f in facts],
                                   max_new_tokens=max_new_tokens)
    out, k = [], len(facts)
    for i, f in enumerate(facts):
        p_true = None
        if f.target_true is not None:
            p_true, k = math.exp(-nll[k]), k + 1
        out.append(FactState(p_new=math.exp(-nll[i]), p_true=p_true, continuation=texts[i]))
    return out


def format_fact_table(facts, before: Sequence[FactState], after: Sequence[FactState]) -> str:
    def p(x):
        return "-" if x is None else f"{x:.3f}"

    lines = []
    for f, b, a in zip(facts, before, after):
        lines.append(f"[{f.case_id}] {f.filled_prompt} -> {f.target_new}"
                     + (f" (was {f.target_true})" if f.target_true else ""))
        lines.append(f"    P(new)  {p(b.p_new)} -> {p(a.p_new)}    P(true) {p(b.p_true)} -> {p(a.p_true)}")
        lines.append(f"    before: {b.continuation!r}")
        lines.append(f"    after:  {a.continuation!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- writing
def _temporary_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def write_model(out: Path, params, cfg, tokenizer, fmt: str, *, source, gguf_dtype: str) -> None:
    """Writes the edited model to `out` all at once: into a temporary sibling first, renamed at the
    end, so an error or Ctrl-C leaves nothing at `out`."""
    from llama3_flax import checkpoint, gguf_export

    if fmt == "gguf":  # save_gguf itself writes a temporary file and renames it
        gguf_export.save_gguf(out, params, cfg, tokenizer_source=source, dtype=gguf_dtype)
        return
    tmp = _temporary_sibling(out)
    try:
        checkpoint.save_hf_folder(tmp, params, cfg, tokenizer)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_source(model: str, tokenizer):
    """What a GGUF export takes its tokenizer metadata from: the source GGUF when there is one."""
    from llama3_flax import checkpoint

    if model == "smollm2":
        return checkpoint.smollm2_gguf_path()
    if str(model).lower().endswith(".gguf"):
        return Path(model)
    return tokenizer


# -------------------------------------------------------------------------------------- commands
def edit_command(args) -> int:
    from jaxedit import compilation_cache, methods
    from jaxedit.data import paths
    from jaxedit.data.facts import read_facts
    from jaxedit.editing import covariance, editor, schedule, templates
    from llama3_flax import checkpoint

    # Cheap checks first: nothing is loaded for a command line that cannot succeed.
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} exists; choose another path or remove it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if args.format == "gguf" and out.suffix != ".gguf":
        raise UsageError(f"--out {out}: a GGUF file name ends in .gguf")
    if args.format == "gguf" and args.gguf_dtype not in GGUF_DTYPES:
        raise UsageError(f"--gguf_dtype {args.gguf_dtype!r}: one of {', '.join(GGUF_DTYPES)}")
    method = methods.method(args.method)
    layers = _layers(args.layers)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    facts = read_facts(args.facts)

    compilation_cache.enable(args.jit_cache)
    cfg, params, tok = checkpoint.load_model(args.model)
    hp = resolve_hparams(args.hparams, method.name, cfg, layers=layers, corpus=args.corpus,
                         cov_samples=args.cov_samples)
    print(f"{method.title} at layer(s) {list(hp.layers)} of {args.model}: {len(facts)} fact(s)", flush=True)
    cache = paths.cache_dir()
    C0 = covariance.preservation_covariance(params, cfg, tok, hp.layers, hp.covariance, cache_dir=cache / "cov",
                                            progress=True)
    groups = templates.context_templates(params, cfg, tok, hp.templates, cache_dir=cache)
    before = fact_states(params, cfg, tok, facts, args.max_new_tokens)
    size = method.max_requests or args.batch_size or len(facts)
    if size >= len(facts):
        edited, report = editor.edit(params, cfg, tok, facts, hp, covariances=C0, templates=groups)
        reports = [report]
    else:
        edited, outcomes = schedule.sequential_batched_edit(params, cfg, tok, facts, hp, covariances=C0,
                                                            templates=groups, batch_size=size)
        reports = [o.report for o in outcomes]
    after = fact_states(edited, cfg, tok, facts, args.max_new_tokens)
    print(format_fact_table(facts, before, after))
    for r in reports:
        for line in (*r.repairs, *r.warnings):
            print(f"note: {line}")
    write_model(out, edited, cfg, tok, args.format, source=_gguf_source(args.model, tok), gguf_dtype=args.gguf_dtype)
    if args.report:
        rows = [{"case_id": f.case_id, "prompt": f.filled_prompt, "target_new": f.target_new,
                 "target_true": f.target_true, "before": dataclasses.asdict(b), "after": dataclasses.asdict(a)}
                for f, b, a in zip(facts, before, after)]
        Path(args.report).write_text(json.dumps({"method": method.name, "layers": list(hp.layers),
                                                 "model": str(args.model), "out": str(out), "facts": rows},
                                                indent=1, default=str))
    print(f"wrote {out} ({args.format})")
    return 0


def evaluate_command(args) -> int:
    from jaxedit import compilation_cache
    from jaxedit.data.counterfact import load_counterfact
    from jaxedit.eval import metrics, tables
    from llama3_flax import checkpoint

    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    cases = load_counterfact(args.cases, n=args.n, seed=args.seed)
    compilation_cache.enable(args.jit_cache)
    cfg, params, tok = checkpoint.load_model(args.model)
    result = metrics.evaluate(params, cfg, tok, cases, batch_size=args.batch_size)
    print(tables.format_table({str(args.model): result.aggregate}))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "cases": str(args.cases), "n": len(cases), "seed": args.seed,
            "aggregate": result.aggregate.as_dict(),
            "per_case": [{k: v for k, v in dataclasses.asdict(c).items()
                          if k not in ("rewrite_nll", "paraphrase_nll", "neighborhood_nll")} for c in result.cases]},
            indent=1, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; errors in the input end with a one-line message and exit status 2."""
    from jaxedit.data.facts import FactsFileError

    args = _parser().parse_args(argv)
    command = {"edit": edit_command, "evaluate": evaluate_command}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("jaxedit: cancelled; nothing was written", file=sys.stderr)
        return 130
    except (UsageError, FactsFileError, FileNotFoundError, ValueError) as e:
        print(f"jaxedit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
