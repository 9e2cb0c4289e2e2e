"""Shared pieces of the experiment programs: flags, model / data / covariance / template loading, a
value cache, and the resumable JSONL results log.

Resumability. Every program appends one JSON record per finished unit of work to its --out file,
written with a single write() on an O_APPEND descriptor, flushed and fsynced at once. On (re)start the
file is read back: a last line without its newline (a crash mid-write) is dropped and the file is cut
back to the last complete line before anything new is appended, so a record is never half-kept and
never duplicated. Each record carries `key` (what cell it belongs to, including the settings that
define the run: model, case count, seed...) and `attempt` (a random id per program run and cell), so
readers can tell a finished cell (a record with "type": "cell") from the left-overs of an interrupted
one (per-batch records of an attempt that never wrote its "cell" record).

Models. --model=smollm2 (the offline SmolLM2-135M GGUF), a .gguf file or an HF folder, or
"tiny-random": a 4-layer random Llama with a word-level hashing tokenizer (`WordHashTokenizer`),
for tests of the programs' plumbing in seconds (its metrics mean nothing).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import flags

FLAGS = flags.FLAGS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "cache"  # gitignored
TINY = "tiny-random"
METRICS = ("es", "ps", "ns", "s", "em", "pm", "nm")


def define_common_flags(default_out: str):
    """Flags every sweep shares (call once, at import of the program module)."""
    flags.DEFINE_string("model", "smollm2", "'smollm2' (offline GGUF), a .gguf file, an HF folder, or "
                        f"'{TINY}' (random 4-layer model + word tokenizer, for tests)")
    flags.DEFINE_string("counterfact", "edit", "CounterFact source for jaxedit.counterfact.load_counterfact: "
                        "'edit'/'train' (shared data, $JAXEDIT_DATA), a local .json, 'original', an URL")
    flags.DEFINE_integer("seed", 0, "seed of the CounterFact case selection")
    flags.DEFINE_string("out", default_out, "JSONL results file (appended to; finished cells are skipped)")
    flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE), "covariance / template / value caches")
    flags.DEFINE_string("corpus", None, "corpus for the preservation covariance C0 (default: "
                        "<data>/corpus/wikitext-103-valid.tokens)")
    flags.DEFINE_integer("cov_samples", None, "override the preset's covariance sample count")
    flags.DEFINE_integer("cov_max_length", None, "override the preset's covariance sample length")
    flags.DEFINE_integer("v_steps", None, "override the value optimisation's number of Adam steps")
    flags.DEFINE_string("jit_cache", os.environ.get("JAXEDIT_JIT_CACHE", ""), "persistent XLA compilation "
                        "cache folder (default $JAXEDIT_JIT_CACHE; empty: off)")
    flags.DEFINE_float("test_pause_after_cell", 0.0, "testing hook: sleep this long after each finished "
                       "cell (lets a test kill a tiny run mid-way)")
    flags.DEFINE_boolean("value_cache", True, "keep target values on disk per (model, layer, case, "
                         "hparams), so sweeps sharing the unedited model reuse them")


def init_jax(jit_cache: str | None = None):
    """Turns on JAX's persistent compilation cache when a folder is given (restarts skip recompiling)."""
    jit_cache = FLAGS.jit_cache if jit_cache is None else jit_cache
    if not jit_cache:
        return
    import jax

    try:
        jax.config.update("jax_compilation_cache_dir", str(jit_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception as e:  # an older/newer JAX without these options: run without the cache
        logging.warning("persistent compilation cache not enabled: %s", e)


# =============================================================================== tiny test model
class WordHashTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per word or punctuation mark (hashed into the
    vocabulary), BOS prepended by default. Enough for the editing and metrics code paths."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    _RE = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size
        self._words: dict[int, str] = {}

    def __len__(self):
        return self.vocab_size

    def _id(self, word: str) -> int:
        i = 3 + zlib_crc(word) % (self.vocab_size - 3)
        self._words.setdefault(i, word)
        return i

    def __call__(self, text, add_special_tokens=True, verbose=True, **_):
        ids = [self._id(w) for w in self._RE.findall(text)]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False, **_):
        out = []
        for i in ids:
            i = int(i)
            if i < 3:
                if not skip_special_tokens:
                    out.append(f"<{i}>")
                continue
            out.append(self._words.get(i, f"w{i}"))
        return "".join(" " + w for w in out)


def zlib_crc(word: str) -> int:
    import zlib

    return zlib.crc32(word.encode("utf-8"))


def tiny_model(seed: int = 0):
    """(cfg, params, tokenizer) of a random 4-layer Llama with a word-hashing tokenizer."""
    import jax
    from llama3_flax import config as lconfig, model as lmodel

    cfg = lconfig.tiny(num_hidden_layers=4, vocab_size=256)
    return cfg, lmodel.init_params(cfg, jax.random.PRNGKey(seed), std=0.1), WordHashTokenizer(256)


def load_model(spec: str):
    """(cfg, params, tokenizer) for a --model value."""
    if spec == TINY:
        return tiny_model()
    from llama3_flax import checkpoint

    return checkpoint.load_model(spec)


def preset_name(spec: str) -> str:
    return "smollm2-135m"  # tiny-random borrows SmolLM2's settings, shrunk by hparams_for


def hparams_for(spec: str, method: str, layer: int | None = None, v_steps: int | None = None,
                cov_samples: int | None = None, cov_max_length: int | None = None):
    """The preset hparams of a method for a --model value, with optional overrides."""
    from jaxedit import hparams as H

    hp = H.preset(preset_name(spec), method)
    if spec == TINY:  # cheap: short templates, few samples, few steps
        hp = hp.replace(templates=H.TemplateHparams(groups=((4, 5),)),
                        covariance=H.CovarianceHparams(n_samples=16, max_length=32),
                        value=dataclasses.replace(hp.value, v_num_grad_steps=4), layers=(1,))
    if layer is not None:
        hp = hp.replace(layers=(int(layer),))
    if v_steps is not None:
        hp = hp.replace(value=dataclasses.replace(hp.value, v_num_grad_steps=v_steps))
    if cov_samples is not None or cov_max_length is not None:
        hp = hp.replace(covariance=dataclasses.replace(
            hp.covariance, n_samples=cov_samples or hp.covariance.n_samples,
            max_length=cov_max_length or hp.covariance.max_length))
    return hp


def hparams_from_flags(method: str, layer: int | None = None):
    return hparams_for(FLAGS.model, method, layer, FLAGS.v_steps, FLAGS.cov_samples, FLAGS.cov_max_length)


# ===================================================================================== data
def corpus_path(corpus: str | None = None) -> Path:
    from jaxedit.counterfact import data_dir

    return Path(corpus) if corpus else data_dir() / "corpus" / "wikitext-103-valid.tokens"


def load_cases(source: str, n: int | None = None, seed: int = 0, ids: Sequence | None = None):
    from jaxedit.counterfact import load_counterfact

    return load_counterfact(source, ids=ids, n=n, seed=seed)


def covariances(params, cfg, tok, layers: Sequence[int], hp, cache_dir: str | os.PathLike | None,
                corpus: str | None = None, progress: bool = True) -> dict:
    """{layer: C0} for all layers in one corpus pass (cached on disk per layer)."""
    from jaxedit.covariance import preservation_covariance

    return preservation_covariance(params, cfg, tok, corpus_path(corpus), sorted(set(int(l) for l in layers)),
                                   n_samples=hp.covariance.n_samples, max_length=hp.covariance.max_length,
                                   batch_size=8, cache_dir=None if cache_dir is None else Path(cache_dir) / "cov",
                                   progress=progress)


def templates(params, cfg, tok, hp, cache_dir):
    from jaxedit.templates import context_templates

    return context_templates(params, cfg, tok, hp.templates, cache_dir=cache_dir)


# ============================================================================== value cache
_VALUE_FIELDS = ("target", "init", "delta", "loss", "nll", "steps")


def _code_mtime() -> float:
    """The newest modification time of the modules that compute values: cached values written before
    it are stale (the library changed) and are recomputed."""
    import jaxedit.keys, jaxedit.values

    return max(Path(m.__file__).stat().st_mtime for m in (jaxedit.values, jaxedit.keys))


def _value_key(fingerprint: str, hp, groups) -> str:
    site = "mlp" if hp.method == "rome" else "resid"
    desc = json.dumps({"model": fingerprint, "layer": hp.layers[-1], "site": site,
                       "value": dataclasses.asdict(hp.value), "templates": [list(g) for g in groups]},
                      sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


class ValueCache:
    """Target values of single requests on one (unedited) model, on disk per (model fingerprint,
    layer, site, value hparams, templates) and case id. A value depends only on its own request (the
    batched optimisation is independent per request), so values computed in any batch can be reused
    by any later edit of the same case on the same model: the layer sweep, the batch sweep and the
    first batch of a sequential run share them."""

    def __init__(self, params, cfg, tok, cache_dir: str | os.PathLike | None, enabled: bool = True):
        from jaxedit.cache import model_fingerprint

        self.params, self.cfg, self.tok = params, cfg, tok
        self.dir = Path(cache_dir) / "values" if (cache_dir is not None and enabled) else None
        self.fingerprint = model_fingerprint(params, cfg) if self.dir is not None else None

    def get(self, requests, hp, groups, chunk_size: int = 64):
        """Values (batch of len(requests)) for requests on the cache's model, computing missing ones in
        one batched call."""
        import jax
        import jax.numpy as jnp
        from jaxedit.editor import edit_values
        from jaxedit.values import Values

        requests = tuple(requests)
        if self.dir is None:
            return edit_values(self.params, self.cfg, self.tok, requests, hp, templates=groups,
                               chunk_size=chunk_size)
        folder = self.dir / _value_key(self.fingerprint, hp, groups)
        have: dict[Any, dict] = {}
        fresh_after = _code_mtime()
        for r in requests:
            p = folder / f"{_safe(r.case_id)}.npz"
            if p.is_file() and p.stat().st_mtime >= fresh_after:
                try:
                    with np.load(p) as z:
                        have[r.case_id] = {f: np.array(z[f]) for f in _VALUE_FIELDS}
                except Exception:  # a torn file: recompute
                    pass
        missing = [r for r in requests if r.case_id not in have]
        if missing:
            vals = jax.device_get(edit_values(self.params, self.cfg, self.tok, missing, hp, templates=groups,
                                              chunk_size=chunk_size))
            folder.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(missing):
                row = {f: np.asarray(getattr(vals, f)[i]) for f in _VALUE_FIELDS}
                have[r.case_id] = row
                tmp = folder / f".{_safe(r.case_id)}.{uuid.uuid4().hex[:6]}.npz"
                np.savez(tmp, **row)
                os.replace(tmp, folder / f"{_safe(r.case_id)}.npz")
        return Values(**{f: jnp.asarray(np.stack([have[r.case_id][f] for r in requests])) for f in _VALUE_FIELDS})


def _safe(x) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(x))


def slice_values(values, i: int, j: int | None = None):
    import jax

    j = i + 1 if j is None else j
    return jax.tree_util.tree_map(lambda x: x[i:j], values)


# ========================================================================= metrics as JSON
def aggregate_dict(agg) -> dict:
    d = {k: _num(getattr(agg, k)) for k in METRICS}
    d["n_cases"] = int(agg.n_cases)
    return d


def case_dicts(cases) -> list[dict]:
    return [{"case_id": c.case_id, **{k: _num(getattr(c, k)) for k in ("es", "ps", "ns", "em", "pm", "nm")}}
            for c in cases]


def aggregate_cases(case_rows: Sequence[Mapping]) -> dict:
    """Aggregate of per-case dicts (the same means and S as jaxedit.metrics.aggregate)."""
    from jaxedit import metrics

    cases = [metrics.CaseMetrics(case_id=c["case_id"], **{k: _nan(c[k]) for k in ("es", "ps", "ns", "em", "pm", "nm")})
             for c in case_rows]
    return aggregate_dict(metrics.aggregate(cases))


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _nan(x):
    return float("nan") if x is None else float(x)


# ======================================================================= resumable JSONL log
def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Complete records of a JSONL file.

    A last line without its trailing newline is a torn write: it is ignored (and, with repair=True,
    cut off the file so that later appends start on a fresh line). A complete line that is not valid
    JSON is skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        logging.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s:%d: skipping a malformed line", path, n)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def key_id(key: Mapping) -> str:
    """Canonical string of a cell key (for set membership)."""
    return json.dumps(key, sort_keys=True, default=str)


class ResultsLog:
    """Append-only JSONL results of one program (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_jsonl(self.path, repair=True)

    def finished(self) -> set[str]:
        """key_id of every cell with a final ("type": "cell") record."""
        return {key_id(r["key"]) for r in self.records if r.get("type") == "cell" and "key" in r}

    def is_finished(self, key: Mapping) -> bool:
        return key_id(key) in self.finished()

    def append(self, record: Mapping) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(json.loads(line))
        if record.get("type") == "cell" and getattr(FLAGS, "test_pause_after_cell", 0.0):
            time.sleep(FLAGS.test_pause_after_cell)
        return record


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


def latest_complete(records: Iterable[Mapping]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """For each cell key: its last "cell" record, and the "batch" records of that same attempt (in
    batch order). Records of interrupted attempts (no "cell" record) and of superseded ones are left
    out, so a cell recomputed after a crash is counted once."""
    records = list(records)
    cells: dict[str, dict] = {}
    for r in records:
        if r.get("type") == "cell" and "key" in r:
            cells[key_id(r["key"])] = r
    batches: dict[str, list[dict]] = {k: [] for k in cells}
    seen: set = set()
    for r in records:
        if r.get("type") != "batch" or "key" not in r:
            continue
        k = key_id(r["key"])
        if k in cells and r.get("attempt") == cells[k].get("attempt") and (k, r.get("batch_index")) not in seen:
            seen.add((k, r.get("batch_index")))
            batches[k].append(r)
    for k in batches:
        batches[k].sort(key=lambda r: r.get("batch_index", 0))
    return cells, batches


def parse_int_list(text: str | Sequence) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    return [int(x) for x in str(text).replace(",", " ").split()]


@dataclasses.dataclass(frozen=True)
class BatchSizeSweep:
    """What the batch and sequential-batched sweeps share: the model, per-method hparams at one edit
    layer, the results log, and the (method, batch size) cells still to run."""

    cfg: Any
    params: Any
    tok: Any
    hps: dict
    layer: int
    log: "ResultsLog"
    todo: list


def plan_batch_size_sweep(flags_, cell_key, name: str, extra: str = "") -> BatchSizeSweep:
    """Loads the model and finds the unfinished (method, batch size) cells of a batch-size sweep."""
    methods = [m.strip() for m in flags_.methods.split(",") if m.strip()]
    sizes = parse_int_list(flags_.batch_sizes)
    init_jax()
    cfg, params, tok = load_model(flags_.model)
    hps = {m: hparams_from_flags(m, flags_.layer) for m in methods}
    layer = hps[methods[0]].layers[0]
    log = ResultsLog(flags_.out)
    todo = [(m, b) for b in sizes for m in methods if not log.is_finished(cell_key(m, layer, b))]
    logging.info("%s at layer %d%s: %d cells to run (%d done) -> %s", name, layer, extra, len(todo),
                 len(sizes) * len(methods) - len(todo), flags_.out)
    return BatchSizeSweep(cfg, params, tok, hps, layer, log, todo)
