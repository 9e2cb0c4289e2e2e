"""The set-up the batch and sequential-batched sweeps share."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from experiments.program import init_jax, parse_int_list
from experiments import results_log
from experiments.results_log import open_log
from experiments.world import hparams_from_flags, load_model


@dataclasses.dataclass(frozen=True)
class BatchSizeSweep:
    """What the batch and sequential-batched sweeps share: the model, per-method hparams at one edit
    layer, the results log, and the (method, batch size) cells still to run."""

    cfg: Any
    params: Any
    tok: Any
    hps: dict
    layer: int
    log: "results_log.ResultsLog"
    todo: list


def plan_batch_size_sweep(flags_, cell_key, name: str, extra: str = "") -> BatchSizeSweep:
    """Loads the model and finds the unfinished (method, batch size) cells of a batch-size sweep."""
    methods = [m.strip() for m in flags_.methods.split(",") if m.strip()]
    sizes = parse_int_list(flags_.batch_sizes)
    init_jax()
    cfg, params, tok = load_model(flags_.model, flags_.mesh)
    hps = {m: hparams_from_flags(m, flags_.layer, cfg=cfg) for m in methods}
    layer = hps[methods[0]].layers[0]
    log = open_log(flags_.out)
    todo = [(m, b) for b in sizes for m in methods if not log.is_finished(cell_key(m, layer, b))]
    logging.info("%s at layer %d%s: %d cells to run (%d done) -> %s", name, layer, extra, len(todo),
                 len(sizes) * len(methods) - len(todo), flags_.out)
    return BatchSizeSweep(cfg, params, tok, hps, layer, log, todo)
