"""What every experiment program shares at start-up: its common flags, JAX's persistent compilation
cache, and list-valued flag parsing."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import flags

from jaxedit import compilation_cache
from jaxedit.data import paths

FLAGS = flags.FLAGS

DEFAULT_CACHE = paths.cache_dir()  # $JAXEDIT_CACHE or ~/.cache/jaxedit
TINY = "tiny-random"


def define_common_flags(default_out: str):
    """Flags every sweep shares (called at import of the program module). A second program module
    imported into the same process (the test suite imports several) finds them defined and keeps them."""
    if "model" in FLAGS:
        return
    flags.DEFINE_string("model", "smollm2", "'smollm2' (offline GGUF), a .gguf file, an HF folder, or "
                        f"'{TINY}' (random 4-layer model + word tokenizer, for tests)")
    flags.DEFINE_string("counterfact", "edit", "CounterFact source for jaxedit.data.counterfact.load_counterfact: "
                        "'edit'/'train' (shared data, $JAXEDIT_DATA), a local .json, 'original', an URL")
    flags.DEFINE_integer("seed", 0, "seed of the CounterFact case selection")
    flags.DEFINE_string("out", default_out, "JSONL results file (appended to; finished cells are skipped)")
    flags.DEFINE_string("cache_dir", str(DEFAULT_CACHE), "covariance / template / value caches")
    flags.DEFINE_string("corpus", None, "corpus for the preservation covariance C0 (default: "
                        "<data>/corpus/wikitext-103-valid.tokens)")
    flags.DEFINE_integer("cov_samples", None, "override the preset's covariance sample count")
    flags.DEFINE_integer("cov_max_length", None, "override the preset's covariance sample length")
    flags.DEFINE_integer("v_steps", None, "override the value optimisation's number of Adam steps")
    flags.DEFINE_string("jit_cache", None, "persistent XLA compilation cache folder, or 'off' (default "
                        "$JAXEDIT_JIT_CACHE, else <cache dir>/jit; see jaxedit.compilation_cache)")
    flags.DEFINE_float("test_pause_after_cell", 0.0, "testing hook: sleep this long after each finished "
                       "cell (lets a test kill a tiny run mid-way)")
    flags.DEFINE_string("mesh", None, "DATAxMODEL (e.g. 2x4): lay the params out on a device mesh over all "
                        "processes' devices (llama3_flax.sharding), or over this process's own devices with "
                        "--cell_parallelism=per_process; default: one device")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes "
                        "(jax.distributed; every process runs the same command with its own --process_id)")
    flags.DEFINE_integer("num_processes", 1, "processes of one run (each finished cell is written once: by "
                         "process 0 on a global mesh, by the process that ran it with --cell_parallelism=per_process)")
    flags.DEFINE_integer("process_id", 0, "this process's index, 0..num_processes-1")
    flags.DEFINE_enum("cell_parallelism", "global_mesh", ["global_mesh", "per_process"],
                      "with several processes: 'global_mesh' runs every cell on one mesh over all processes' "
                      "devices (jax.distributed; for a model that does not fit one host); 'per_process' gives "
                      "each process its own fixed share of the cells, run on its own devices (--mesh over "
                      "them), with no coordinator: a process that dies leaves only its unfinished cells to a "
                      "rerun of the same commands (the layer, batch and sequential sweeps)")
    flags.DEFINE_integer("heartbeat_timeout", 60, "seconds after which the processes of a run give up on one "
                         "that stopped answering (it died), with an error naming it")
    flags.DEFINE_boolean("value_cache", True, "keep target values on disk per (model, layer, hparams, "
                         "templates) and request content, so sweeps sharing the unedited model reuse them")


def init_jax(jit_cache: str | None = None, cells_per_process: bool = False):
    """Joins the other processes of the run (--num_processes > 1 on a global mesh: jax.distributed)
    and turns on JAX's persistent compilation cache (restarts skip recompiling); --jit_cache=off
    disables it. With --cell_parallelism=per_process the processes never talk to each other (each
    sees only its own devices); programs that can split their cells say so with cells_per_process."""
    from jaxedit import distributed

    if FLAGS.cell_parallelism == "per_process":
        if not cells_per_process:
            raise ValueError("--cell_parallelism=per_process: this program runs on one global mesh only; the "
                             "layer, batch and sequential sweeps split their cells between processes")
        process_share()  # checks --process_id and --num_processes
        if FLAGS.coordinator_address:
            logging.info("--cell_parallelism=per_process: --coordinator_address is not used (no coordinator)")
    else:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    compilation_cache.enable(FLAGS.jit_cache if jit_cache is None else jit_cache)


def process_share() -> tuple[int, int] | None:
    """(process_id, num_processes) when each process runs its own share of the cells
    (--cell_parallelism=per_process); None when every process runs every cell (one global mesh)."""
    if FLAGS.cell_parallelism != "per_process":
        return None
    if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ValueError(f"--process_id={FLAGS.process_id} must be in 0..{FLAGS.num_processes - 1} "
                         f"(--num_processes={FLAGS.num_processes})")
    return FLAGS.process_id, FLAGS.num_processes


def parse_mesh(text: str | None) -> tuple[int, int] | None:
    """--mesh "DxM" -> (D, M); None for one device."""
    if not text:
        return None
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh={text!r}: expected DATAxMODEL, e.g. 2x4") from None
    return data, model


def parse_int_list(text: str | Sequence) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    return [int(x) for x in str(text).replace(",", " ").split()]


def cell_key(sweep: str, **fields) -> dict:
    """A results cell's key: the sweep, what defines the run (model, CounterFact source, case seed),
    and the cell's own fields."""
    return {"sweep": sweep, "model": FLAGS.model, "counterfact": FLAGS.counterfact, "seed": FLAGS.seed, **fields}


def run(main) -> None:
    """absl's app.run(main), with a results file held by another process reported in one line (exit 2)."""
    from absl import app

    from experiments.results_log import ResultsFileInUse

    def guarded(argv):
        try:
            return main(argv)
        except ResultsFileInUse as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
