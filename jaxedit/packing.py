"""Laying variable-length pieces into fixed shapes: few distinct shapes (jit compilations), little padding."""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence


def bucket(n: int, multiple: int = 8) -> int:
    """Rounds a length up to a multiple, so padded shapes (and jit compilations) come in few sizes."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket_geometric(n: int, minimum: int = 8) -> int:
    """Rounds n up to the next of minimum * {1, 1.5} * 2^k (minimum, 1.5 minimum, 2 minimum, 3 minimum,
    4 minimum, ...): a few shapes over any range of sizes, at most a third of them padding."""
    size = minimum
    while True:
        if n <= size:
            return size
        middle = size * 3 // 2
        if middle > size and n <= middle:
            return middle
        size *= 2


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items into bins of `capacity`: largest first (ties by index), each into the first bin
    with room. Returns the bins as lists of item indices, in the order they were filled."""
    if any(s > capacity for s in sizes):
        raise ValueError(f"an item of size {max(sizes)} does not fit bins of capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # bins with room left, in the order they were made: full ones are never scanned
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        at = next((k for k, b in enumerate(open_bins) if sizes[i] <= room[b]), None)
        if at is None:
            bins.append([])
            room.append(capacity)
            open_bins.append(len(bins) - 1)
            at = len(open_bins) - 1
        b = open_bins[at]
        bins[b].append(i)
        room[b] -= sizes[i]
        if room[b] == 0:
            del open_bins[at]
    return bins


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Indices (into a list of sequences) of one batch, all padded to `width` tokens."""

    indices: tuple[int, ...]
    width: int


def plan_buckets(lengths: Sequence[int], batch_size: int, multiple: int = 8) -> tuple[Bucket, ...]:
    """Sorts sequences by length and cuts them into batches of at most batch_size sharing a width.

    Width = length rounded up to `multiple`, so the number of distinct shapes is the number of
    distinct rounded lengths (the batch dimension is always padded to batch_size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    by_width: dict[int, list[int]] = collections.defaultdict(list)
    for i in order:
        by_width[bucket(lengths[i], multiple)].append(i)
    return tuple(Bucket(tuple(idx[s:s + batch_size]), width)
                 for width, idx in sorted(by_width.items()) for s in range(0, len(idx), batch_size))
