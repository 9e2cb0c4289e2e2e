"""The set-up the sweeps share: which cells this process runs, and the batch and sequential-batched
sweeps' model, hparams and unfinished cells."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Hashable, Sequence

from experiments.program import init_jax, parse_int_list, process_share
from experiments import results_log
from experiments.results_log import open_log
from experiments.world import hparams_from_flags, load_model


def share_of(cells: Sequence, process_id: int, num_processes: int, group: Callable[[Any], Hashable] = lambda c: c,
             cost: Callable[[Any], float] = lambda c: 1.0) -> list:
    """The cells (in their order) that process `process_id` of `num_processes` runs.

    Cells of one group (a layer, a batch size: cells that share C0 or values) go to one process;
    groups are dealt out largest first to the process with the least work so far (ties: the lower
    process id, groups in their order). It depends only on the planned cells, never on which are
    finished, so every process and every rerun of the same commands computes the same disjoint shares."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in 0..{num_processes - 1}")
    groups: dict = {}
    for c in cells:
        groups.setdefault(group(c), []).append(c)
    load = [0.0] * num_processes
    owner = {}
    for g in sorted(groups, key=lambda g: -sum(cost(c) for c in groups[g])):  # sorted() is stable
        p = min(range(num_processes), key=lambda i: (load[i], i))
        owner[g] = p
        load[p] += sum(cost(c) for c in groups[g])
    return [c for c in cells if owner[group(c)] == process_id]


def cells_of_this_process(cells: Sequence, group: Callable[[Any], Hashable] = lambda c: c,
                          cost: Callable[[Any], float] = lambda c: 1.0) -> list:
    """All planned cells on a global mesh (every process runs every cell); this process's share_of
    them with --cell_parallelism=per_process."""
    share = process_share()
    if share is None:
        return list(cells)
    mine = share_of(cells, *share, group=group, cost=cost)
    logging.info("process %d of %d runs %d of the %d planned cells", share[0], share[1], len(mine), len(cells))
    return mine


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


def plan_batch_size_sweep(flags_, cell_key, name: str, extra: str = "",
                          cost: Callable[[int], float] = lambda batch_size: 1.0) -> BatchSizeSweep:
    """Loads the model and finds the unfinished (method, batch size) cells of a batch-size sweep
    (this process's share of them with --cell_parallelism=per_process: the methods of one batch size
    together, `cost(batch_size)` the work of one cell)."""
    methods = [m.strip() for m in flags_.methods.split(",") if m.strip()]
    sizes = parse_int_list(flags_.batch_sizes)
    init_jax(cells_per_process=True)
    cfg, params, tok = load_model(flags_.model, flags_.mesh)
    hps = {m: hparams_from_flags(m, flags_.layer, cfg=cfg) for m in methods}
    layer = hps[methods[0]].layers[0]
    log = open_log(flags_.out, process_share())
    mine = cells_of_this_process([(m, b) for b in sizes for m in methods], group=lambda c: c[1],
                                 cost=lambda c: cost(c[1]))
    todo = [(m, b) for m, b in mine if not log.is_finished(cell_key(m, layer, b))]
    logging.info("%s at layer %d%s: %d cells to run (%d done) -> %s", name, layer, extra, len(todo),
                 len(mine) - len(todo), flags_.out)
    return BatchSizeSweep(cfg, params, tok, hps, layer, log, todo)
