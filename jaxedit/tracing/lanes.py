"""Where every restoration of one prompt runs: two restorations per row ("lane"), rows in chunks.

A restoration (a site: kind, layer window, token i, noise sample) only changes the slots i..T-1 of
its corrupted run; the earlier slots are the corrupted run's, read from its key/value cache. So it
runs T - i slots, and the restorations at tokens i and T-1-i fill a lane of T + 1 slots together,
with no padding. Each lane token sees the earlier tokens of its own restoration and the cached slots
< i of its noise sample.

Lanes are sorted by the first layer they restore and cut into chunks of equal size: a chunk starts at
its lanes' lowest first layer, from the corrupted run's residual stream there (no restoration is
earlier, so the layers before it are the corrupted run's). Everything depends only on the padded
prompt width, the layer count and the sample count, so prompts of one width share a compilation.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np

from llama3_flax.model import RESTORE_ATTN, RESTORE_MLP, RESTORE_RESID

KINDS = ("resid", "mlp", "attn")
KIND_CODES = (RESTORE_RESID, RESTORE_MLP, RESTORE_ATTN)  # the order of KINDS


def restored_layers(kind: int, layer: int, num_layers: int, window: int) -> tuple[int, int]:
    """The layers [first, last] restored for a site centred on `layer`: the layer alone for residual
    outputs; for MLP and attention outputs a window of `window` layers, layer - window // 2 up to
    layer + (window - 1) // 2, cut at the model's ends (the ROME paper's intervals)."""
    if kind == RESTORE_RESID:
        return layer, layer
    return max(0, layer - window // 2), min(num_layers - 1, layer + (window - 1) // 2)


@flax.struct.dataclass
class Lanes:
    """The restoration rows of a prompt: G chunks of C lanes of W = width + 1 slots.

    sample: (G, C) the noise sample of each lane.
    token: (G, C, W) the prompt slot each lane slot runs (-1 for padding).
    end: (G, C, W) the lane slot after the token's restoration (0 for padding: seen by nothing).
    site_token: (G, C, W) the restored token of the slot's restoration (0 for padding: no cached
      slot is seen).
    slots, kind, first, last: (G, C, 2) the two restorations of each lane (model.Restoration; slot -1
      when absent). source: (G, C, 2) their rows in the clean values table (kind * width + token).
    readout: (G, C, 2) the lane slot of each restoration's last token (where P(object) is read).
    chunk_first: (G,) the first layer each chunk runs.
    """

    sample: jax.Array
    token: jax.Array
    end: jax.Array
    site_token: jax.Array
    slots: jax.Array
    kind: jax.Array
    first: jax.Array
    last: jax.Array
    source: jax.Array
    readout: jax.Array
    chunk_first: jax.Array


@dataclasses.dataclass(frozen=True)
class LanePlan:
    """Lanes (for the device) and, per lane restoration, its site (for the host): the flat index
    (kind * L + layer) * width + token into a (kinds, L, width) grid, -1 where absent."""

    lanes: Lanes
    site: np.ndarray


# Chunks start at their lowest first layer: with 8 or more, the layers run are within about a tenth of
# the fewest possible (each lane from its own first layer), for the ROME windows.
MIN_CHUNKS = 8


def lane_count(width: int, num_layers: int, samples: int) -> int:
    """Lanes of a prompt of `width` tokens: one per pair of tokens, layer, kind and sample."""
    return samples * len(KINDS) * num_layers * (-(-width // 2))


def plan_lanes(length: int, width: int, num_layers: int, samples: int, window: int, chunk_tokens: int) -> LanePlan:
    """The lanes of every restoration of a prompt of `length` tokens padded to `width`.

    chunk_tokens: at most about this many lane slots run at once (memory); there are at least
    MIN_CHUNKS chunks, as even as the lane count allows.
    """
    if not 1 <= length <= width:
        raise ValueError(f"a prompt of {length} tokens does not fit width {width}")
    w = width + 1
    total = lane_count(width, num_layers, samples)
    chunks = min(total, max(MIN_CHUNKS, -(-total * w // chunk_tokens)))
    per_chunk = -(-total // chunks)
    n = chunks * per_chunk
    sample = np.zeros(n, np.int32)
    token = np.full((n, w), -1, np.int32)
    end = np.zeros((n, w), np.int32)
    site_token = np.zeros((n, w), np.int32)
    pair = lambda: np.full((n, 2), -1, np.int32)
    slots, kind, first, last, source, readout, site = pair(), pair(), pair(), pair(), pair(), pair(), pair()
    lane_first = np.full(n, num_layers, np.int32)  # padding lanes sort last
    lane = 0
    for s in range(samples):
        for k, code in enumerate(KIND_CODES):
            for layer in range(num_layers):
                lo, hi = restored_layers(code, layer, num_layers, window)
                for i in range(-(-length // 2)):
                    at = 0
                    for p, t in enumerate(dict.fromkeys((i, length - 1 - i))):  # one site when they meet
                        run = length - t
                        token[lane, at:at + run] = np.arange(t, length)
                        end[lane, at:at + run] = at + run
                        site_token[lane, at:at + run] = t
                        slots[lane, p], kind[lane, p], first[lane, p], last[lane, p] = at, code, lo, hi
                        source[lane, p], readout[lane, p] = k * width + t, at + run - 1
                        site[lane, p] = (k * num_layers + layer) * width + t
                        at += run
                    sample[lane], lane_first[lane] = s, lo
                    lane += 1
    order = np.argsort(lane_first, kind="stable")
    grouped = lambda x: x[order].reshape(chunks, per_chunk, *x.shape[1:])
    chunk_first = lane_first[order].reshape(chunks, per_chunk).min(axis=1)
    lanes = Lanes(sample=grouped(sample), token=grouped(token), end=grouped(end), site_token=grouped(site_token),
                  slots=grouped(slots), kind=grouped(kind), first=grouped(first), last=grouped(last),
                  source=grouped(source), readout=grouped(readout), chunk_first=chunk_first.astype(np.int32))
    return LanePlan(lanes=lanes, site=grouped(site))
