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

Flags, facts, hparams and the output location are checked before the model loads; an error is one
line naming the flag or file (exit status 2; --debug shows the traceback). The output is written into
a locked temporary sibling, .NAME.partial-PID, and renamed at the end; one left by a killed run is
removed by the next run for the same --out, which says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
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
class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxedit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    e = sub.add_parser("edit", parents=[common], help="edit facts in a model and write the edited model")
    e.add_argument("--model", default="smollm2", help="'smollm2', an HF folder, a .gguf file or a hub id")
    e.add_argument("--facts", required=True, help="a .jsonl, .json or .csv file of facts (jaxedit.data.facts)")
    e.add_argument("--method", required=True, help="rome, memit, emmet or alphaedit")
    e.add_argument("--layers", default=None, help="comma-separated layers to edit (default: the preset's)")
    e.add_argument("--hparams", default="auto", help=f"a preset ({', '.join(PRESETS)}; 'auto' picks by "
                   "model), or an EasyEdit .yaml / reference .json hparams file")
    e.add_argument("--batch_size", type=int, default=None, help="MEMIT/EMMET: facts per update (default: "
                   "all in one batch); ROME always edits one fact at a time")
    e.add_argument("--out", required=True, help="where the edited model goes (must not exist)")
    e.add_argument("--format", default="hf", choices=FORMATS, help="hf (a folder for transformers) or gguf")
    e.add_argument("--gguf_dtype", default=None, help="with --format gguf: the tensor type, float16 "
                   "(default), float32, bfloat16 or q8_0")
    e.add_argument("--corpus", default=None, help="C0 corpus (default: the preset's, in $JAXEDIT_DATA/corpus)")
    e.add_argument("--cov_samples", type=int, default=None, help="override the preset's C0 sample count")
    e.add_argument("--report", default=None, help="also write the before/after numbers as JSON here")
    e.add_argument("--jit_cache", default=None, help="compiled-program cache folder, or 'off'")
    e.add_argument("--max_new_tokens", type=int, default=8, help="length of the greedy continuations shown")

    v = sub.add_parser("evaluate", parents=[common], help="CounterFact ES/PS/NS/S of a model")
    v.add_argument("--model", default="smollm2", help="'smollm2', an HF folder, a .gguf file or a hub id")
    v.add_argument("--cases", default="edit", help="CounterFact source: 'edit'/'train' ($JAXEDIT_DATA), a "
                   "local .json/.jsonl file, or 'original'")
    v.add_argument("--n", type=int, default=None, help="evaluate n cases drawn with --seed (default: all)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch_size", type=int, default=16, help="rows per scoring call")
    v.add_argument("--json", default=None, help="also write the aggregate and per-case metrics as JSON here")
    v.add_argument("--jit_cache", default=None, help="compiled-program cache folder, or 'off'")
    return parser


def _layers(text: str | None, method) -> tuple[int, ...] | None:
    """--layers as increasing, distinct layer indices the method can edit (the model's own range is
    checked once its config is known)."""
    if text is None:
        return None
    try:
        layers = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise UsageError(f"--layers must be layer indices >= 0, got {text!r}")
    if list(layers) != sorted(set(layers)):
        raise UsageError(f"--layers must be increasing and distinct, got {text!r} (e.g. {','.join(map(str, sorted(set(layers))))})")
    try:
        method.check_layers(layers)
    except ValueError as e:
        raise UsageError(f"--layers {text}: {e}") from None
    return layers


def _at_least(flag: str, value, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def known_presets() -> tuple[str, ...]:
    """The preset names --hparams takes: jaxedit.hparams' presets."""
    from jaxedit import hparams as H

    return tuple(sorted(set(PRESETS) | set(H.PRESET_NAMES)))


def check_hparams_choice(choice: str) -> None:
    """UsageError, before the model loads, for an --hparams that is neither a preset nor a hparams file."""
    if choice == "auto" or choice in known_presets():
        return
    if Path(choice).suffix.lower() in (".yaml", ".yml", ".json"):
        if not Path(choice).is_file():
            raise UsageError(f"--hparams {choice}: no such file")
        return
    raise UsageError(f"--hparams {choice!r} is neither a preset ({', '.join(known_presets())}, auto) nor a "
                     ".yaml/.json hparams file")


def check_corpus(corpus: str, flag: str) -> None:
    """UsageError for a C0 corpus that names a local file that is not there (hub datasets are not
    looked up here)."""
    from jaxedit.data.corpus import CorpusSpec

    try:
        spec = CorpusSpec.parse(corpus)
    except (ValueError, OSError) as e:
        raise UsageError(f"{flag} {corpus}: {e}") from None
    if spec.path and not Path(spec.path).is_file():
        raise UsageError(f"{flag} {corpus}: no corpus file at {spec.path} (set JAXEDIT_DATA to the data folder, or "
                         "give the file's path)")


def model_source(model: str):
    """What load_model is given for --model: "smollm2", a local path that exists, or the local folder of
    a hub id (resolved now: an id missing from the hub cache fails before anything else is done)."""
    from llama3_flax import checkpoint, hub

    if model == "smollm2":
        checkpoint.smollm2_gguf_path()  # FileNotFoundError saying how to install it
        return model
    if hub.is_hub_id(model):
        return hub.resolve_model(model)
    path = Path(model)
    if not path.exists():
        raise UsageError(f"--model {model}: no such file or folder (and not 'smollm2' or a hub id owner/name)")
    if path.is_dir() and path.suffix.lower() == ".gguf":
        raise UsageError(f"--model {model} is a folder with a .gguf name; load_model reads .gguf names as GGUF "
                         "files: rename the folder")
    return path


def check_result_file(path: str | None, flag: str, inputs: dict) -> None:
    """UsageError, before any work, when a results file (--report, --json) cannot be written, or would
    overwrite one of `inputs` ({flag: path})."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{flag} {p}: not writable; choose a file you can write")
    for other_flag, other in inputs.items():
        if other is not None and p.resolve() == Path(other).resolve():
            raise UsageError(f"{flag} {p} would overwrite {other_flag}; choose another file")


def resolve_hparams(choice: str, method: str, cfg, *, layers=None, corpus=None, cov_samples=None):
    """EditHparams from a preset name ('auto': jaxedit.hparams.preset_for, the preset of the model's
    shape) or a hparams file, with the command line's overrides."""
    from jaxedit import hparams as H
    from jaxedit.interop import hparams_files

    if choice == "auto":  # the model's own preset, or a borrowed one with a logged warning naming it
        hp = H.preset_for(cfg, method)
    elif choice in known_presets():
        hp = H.preset(choice, method)
    elif Path(choice).suffix.lower() in (".yaml", ".yml", ".json"):
        hp = hparams_files.read_hparams(choice, method=method, cfg=cfg, base=H.preset("llama3-8b", method))
    else:
        raise UsageError(f"--hparams {choice!r} is neither a preset ({', '.join(known_presets())}, auto) nor a "
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
def check_output(out: Path, fmt: str) -> None:
    """UsageError for an --out that cannot receive the model: it exists, its folder does not, or its
    name and --format disagree (load_model tells a GGUF file from an HF folder by the .gguf suffix)."""
    if out.exists():
        raise UsageError(f"--out {out} exists; choose another path or remove it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    gguf_name = out.suffix.lower() == ".gguf"
    if fmt == "gguf" and not gguf_name:
        raise UsageError(f"--out {out}: a GGUF file name ends in .gguf (--format gguf)")
    if fmt == "hf" and gguf_name:
        raise UsageError(f"--out {out}: a .gguf name with --format hf would be an HF folder that load_model reads "
                         "as a GGUF file; add --format gguf, or name the folder without .gguf")


_LOCK_NAME = ".lock"


def _lock_is_held(folder: Path) -> bool:
    """Whether a live process holds the lock of a staging folder (a killed run's lock is free)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a staging folder is taken as a killed run's
        return False
    try:
        with open(folder / _LOCK_NAME, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:  # no lock file: killed before it was made
        return False
    return False


class Staging:
    """The temporary sibling folder `.NAME.partial-PID` that a run writes --out into, locked (flock)
    while the run lives and renamed into place at the end, so that an error, Ctrl-C or a kill leaves
    nothing at --out.

    claim() removes the staging folders that killed runs left for the same --out (their lock is
    free) and returns them, so the caller can say so; one whose lock is held belongs to a run writing
    the same --out now, and is refused.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.folder = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._lock = None

    def leftovers(self) -> list[Path]:
        return sorted(self.out.parent.glob(f".{glob.escape(self.out.name)}.partial-*"))

    def claim(self) -> list[Path]:
        removed = []
        for old in self.leftovers():
            if _lock_is_held(old):
                raise UsageError(f"--out {self.out}: another jaxedit run is writing it now ({old} is locked); "
                                 "wait for it to finish, or choose another --out")
            shutil.rmtree(old)
            removed.append(old)
        try:
            self.folder.mkdir()
            self._lock = open(self.folder / _LOCK_NAME, "w")
            try:
                import fcntl
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:
                pass
        except OSError as e:
            self.release()
            raise UsageError(f"--out {self.out}: cannot write in {self.out.parent} ({e.strerror or e}); choose a "
                             "folder you can write to") from None
        return removed

    @property
    def claimed(self) -> bool:
        return self._lock is not None

    def place(self, written: Path) -> None:
        """Moves `written` (inside the staging folder) to --out."""
        os.replace(written, self.out)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        shutil.rmtree(self.folder, ignore_errors=True)


def write_model(out: Path, params, cfg, tokenizer, fmt: str, *, source, gguf_dtype: str,
                staging: Staging | None = None) -> None:
    """Writes the edited model to `out` all at once: into the staging folder first (claimed here
    unless given), moved to `out` at the end; the staging folder is removed either way."""
    from llama3_flax import checkpoint, gguf_export

    staging = staging or Staging(out)
    if not staging.claimed:
        staging.claim()
    try:
        if fmt == "gguf":
            written = gguf_export.save_gguf(staging.folder / Path(out).name, params, cfg, tokenizer_source=source,
                                            dtype=gguf_dtype)
        else:
            written = checkpoint.save_hf_folder(staging.folder / "model", params, cfg, tokenizer)
        staging.place(written)
    finally:
        staging.release()


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
    try:
        method = methods.method(args.method)
    except ValueError as e:
        raise UsageError(f"--method: {e}") from None
    layers = _layers(args.layers, method)
    _at_least("--batch_size", args.batch_size, 1)
    _at_least("--cov_samples", args.cov_samples, 1)
    _at_least("--max_new_tokens", args.max_new_tokens, 0)
    if method.max_requests is not None and (args.batch_size or 1) > method.max_requests:
        raise UsageError(f"--batch_size {args.batch_size}: {method.title} edits {method.max_requests} fact at a time "
                         "(drop --batch_size, or use MEMIT, EMMET or AlphaEdit for batches)")
    if args.gguf_dtype is not None and args.format != "gguf":
        raise UsageError(f"--gguf_dtype {args.gguf_dtype} applies to --format gguf only")
    gguf_dtype = args.gguf_dtype or "float16"
    if args.format == "gguf" and gguf_dtype not in GGUF_DTYPES:
        raise UsageError(f"--gguf_dtype {gguf_dtype!r}: one of {', '.join(GGUF_DTYPES)}")
    check_hparams_choice(args.hparams)
    if args.corpus is not None:
        check_corpus(args.corpus, "--corpus")
    out = Path(args.out)
    check_output(out, args.format)
    check_result_file(args.report, "--report", {"--facts": args.facts, "--out": out})
    facts = read_facts(args.facts)  # also refuses two targets for one prompt and subject
    source = model_source(args.model)
    staging = Staging(out)
    for old in staging.claim():  # proves --out's folder writable before the model loads
        print(f"note: removed {old}, the unfinished output of an interrupted run", flush=True)
    try:
        compilation_cache.enable(args.jit_cache)
        cfg, params, tok = checkpoint.load_model(source)
        try:
            hp = resolve_hparams(args.hparams, method.name, cfg, layers=layers, corpus=args.corpus,
                                 cov_samples=args.cov_samples)
        except ValueError as e:
            raise UsageError(f"{'--layers' if layers is not None else '--hparams ' + args.hparams}: {e}") from None
        check_corpus(hp.covariance.corpus, "the hparams' C0 corpus" if args.corpus is None else "--corpus")
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
        write_model(out, edited, cfg, tok, args.format, source=_gguf_source(args.model, tok), gguf_dtype=gguf_dtype,
                    staging=staging)
    finally:
        staging.release()
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

    _at_least("--n", args.n, 1)
    _at_least("--batch_size", args.batch_size, 1)
    _at_least("--seed", args.seed, 0)
    check_result_file(args.json, "--json", {"--cases": args.cases})
    source = model_source(args.model)
    try:
        cases = load_counterfact(args.cases, n=args.n, seed=args.seed)
    except (ValueError, OSError) as e:
        raise UsageError(f"--cases {args.cases}{' --n ' + str(args.n) if args.n else ''}: {e}") from None
    compilation_cache.enable(args.jit_cache)
    cfg, params, tok = checkpoint.load_model(source)
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


# Errors in what the user gave (flags, files, models, hparams): the message alone, exit status 2.
# Anything else is a program error: its type and message, exit status 1. --debug re-raises both.
_INPUT_ERRORS = (UsageError, ValueError, OSError)  # FactsFileError, CheckpointError, HubModelError among them


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; an error ends with a one-line message (exit status 2 for bad input, 1 for a
    program error; with --debug, the traceback)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error, or the help
        return e.code if isinstance(e.code, int) else 2
    command = {"edit": edit_command, "evaluate": evaluate_command}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("jaxedit: cancelled; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error becomes one line; --debug keeps the traceback)
        if args.debug:
            raise
        if isinstance(e, _INPUT_ERRORS):
            print(f"jaxedit {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"jaxedit {args.command}: error: {type(e).__name__}: {_one_line(e)} (a program error; --debug shows "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
