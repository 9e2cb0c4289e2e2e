"""Independent edits of one model as low-rank changes, to score side by side in one pass.

An edit of n requests changes each edited layer's down_proj by dW = R' A^T of rank <= n (ROME and a
single MEMIT/EMMET edit: rank 1). Edits each made on the same unedited model (the layer sweep's
single edits) need not be materialised as models to be scored: `LowRankEdits` keeps each edit's
factors, and metrics.evaluate(params, ..., edits=...) scores every case under its own edit in one
pass (llama3_flax.model.DownProjUpdates adds each token's own low-rank term to the edited layers).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxedit.distributed import to_host
from jaxedit.eval.scoring import LowRankEdits

#: A change whose best rank-r factorisation misses more than this fraction of its norm is refused.
MAX_RELATIVE_RESIDUAL = 1e-3
#: Extra sketch columns of the range finder (Halko, Martinsson and Tropp 2011: 5-10 suffice).
OVERSAMPLE = 8


def low_rank_factors(delta, rank: int, *, seed: int = 0, rounding: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Factors of a down_proj change dW (D, F) of rank <= `rank`: (left (F, r), right (r, D)), with
    x @ dW.T = (x @ left) @ right.

    A randomised range finder in float64 (dW G with r + OVERSAMPLE columns, orthonormalised, then the
    best rank-r part of dW within that range), exact for rank <= r up to rounding;
    raises ValueError when dW has a larger rank (the residual of the factorisation names it).
    rounding: the Frobenius norm of rounding noise dW may carry beyond its low-rank part (a difference
    of stored weights carries the rounding of the edited ones); a residual within it is accepted.
    """
    d = np.asarray(delta, np.float64)
    if d.ndim != 2:
        raise ValueError(f"a down_proj change must be a (D, F) matrix, got shape {d.shape}")
    if not 1 <= rank <= min(d.shape):
        raise ValueError(f"rank {rank} must be 1..{min(d.shape)} for a change of shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("the down_proj change contains NaN or inf")
    # Oversampled: a sketch of exactly r columns misses a direction whenever the Gaussian test vectors
    # happen to be nearly orthogonal to it, and the noise (rounding) then takes its place.
    width = min(rank + OVERSAMPLE, min(d.shape))
    sketch = d @ np.random.default_rng(seed).standard_normal((d.shape[1], width))  # (D, r + p)
    q, _ = np.linalg.qr(sketch)
    u, sv, vt = np.linalg.svd(q.T @ d, full_matrices=False)  # the best rank-r part within the range
    q, b = q @ u[:, :rank], sv[:rank, None] * vt[:rank]  # (D, r), (r, F)
    norm = np.linalg.norm(d)
    missed = np.linalg.norm(d - q @ b)
    if missed > MAX_RELATIVE_RESIDUAL * norm + rounding:
        within = f" (beyond rounding noise of norm {rounding:.2e})" if rounding else ""
        raise ValueError(f"the down_proj change has rank above {rank}: its rank-{rank} factorisation misses "
                         f"{missed / norm:.2e} of its norm{within}")
    return b.T.astype(np.float32), q.T.astype(np.float32)


def change_of(params, edited, layers: Sequence[int], rank: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (left, right)} of what `edited` changed in `params`' down_proj at `layers` (each of rank
    <= `rank`, e.g. the number of requests of the edit). Other leaves must be unchanged (not checked
    here: the editors change down_proj only)."""
    before, after = params["layers"]["down_proj"], edited["layers"]["down_proj"]
    # Storing W + dW rounds each weight by up to half an ulp, so a small edit of a large W (a late
    # layer's) differs from its low-rank dW by up to eps / 2 * ||W + dW||: noise, not rank.
    eps = float(jnp.finfo(after.dtype).eps)
    out = {}
    for l in layers:
        # the difference and norm are taken where the weights live (a mesh, several processes)
        change = to_host(after[l].astype(np.float32) - before[l].astype(np.float32))
        stored = float(to_host(jnp.linalg.norm(after[l].astype(np.float32))))
        out[int(l)] = low_rank_factors(change, rank, rounding=eps * stored)
    return out


def stack_changes(changes: Sequence[dict[int, tuple[np.ndarray, np.ndarray]]]) -> LowRankEdits:
    """One LowRankEdits from per-edit {layer: (left (F, r), right (r, D))}: edit e is changes[e]. Every
    edit must change the same layers (zero columns stand in where one does not)."""
    if not changes:
        raise ValueError("no edits to stack")
    layers = sorted({l for c in changes for l in c})
    lefts, rights, column_edit = [[] for _ in layers], [[] for _ in layers], []
    for e, change in enumerate(changes):
        rank = max(f[0].shape[1] for f in change.values())
        f_size, d_size = next(iter(change.values()))[0].shape[0], next(iter(change.values()))[1].shape[1]
        for k, layer in enumerate(layers):
            left, right = change.get(layer, (np.zeros((f_size, rank), np.float32), np.zeros((rank, d_size), np.float32)))
            r = left.shape[1]
            lefts[k].append(np.pad(left, ((0, 0), (0, rank - r))))
            rights[k].append(np.pad(right, ((0, rank - r), (0, 0))))
        column_edit += [e] * rank
    return LowRankEdits(layers=tuple(layers), left=np.stack([np.concatenate(x, axis=1) for x in lefts]),
                        right=np.stack([np.concatenate(x, axis=0) for x in rights]),
                        column_edit=np.asarray(column_edit, np.int32))
