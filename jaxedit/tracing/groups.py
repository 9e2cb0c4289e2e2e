"""The paper's token groups, and indirect effects averaged within them over facts."""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
                "further tokens", "last token")


def token_groups(subject: tuple[int, int], length: int) -> tuple[tuple[int, ...], ...]:
    """The tokens of each of TOKEN_GROUPS in a prompt of `length` tokens with the subject at
    [start, end). As in the paper's averages, a token may be in two groups (a one-token subject is its
    first and last token; a first subsequent token that ends the prompt is also the last token), and
    tokens before the subject are in none."""
    start, end = subject
    if not 0 <= start < end <= length:
        raise ValueError(f"subject tokens [{start}, {end}) do not fit a prompt of {length} tokens")
    return ((start,), tuple(range(start + 1, end - 1)), (end - 1,), (end,) if end < length else (),
            tuple(range(end + 1, length - 1)), (length - 1,))


def group_sums(effect: np.ndarray, subject: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One fact's indirect effects (kinds, L, T) summed over each group's tokens: (kinds, groups, L),
    and the (groups,) token counts."""
    kinds, layers, length = effect.shape
    sums = np.zeros((kinds, len(TOKEN_GROUPS), layers))
    counts = np.zeros(len(TOKEN_GROUPS), np.int64)
    for g, tokens in enumerate(token_groups(subject, length)):
        sums[:, g] = effect[:, :, list(tokens)].sum(axis=2)
        counts[g] = len(tokens)
    return sums, counts


def average_by_group(effects: Sequence[np.ndarray], subjects: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Indirect effects (kinds, L, T_f) of several facts, averaged over every (fact, token) of each group.

    Returns:
      (kinds, groups, L) averages (NaN for a group no fact has) and (groups,) token counts.
    """
    if not effects:
        raise ValueError("no traced facts to average")
    per_fact = [group_sums(e, s) for e, s in zip(effects, subjects)]
    sums = np.sum([p[0] for p in per_fact], axis=0)
    counts = np.sum([p[1] for p in per_fact], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[None, :, None], counts


def peak_layer_interval(effects: Sequence[np.ndarray], subjects: Sequence[tuple[int, int]], n_resamples: int = 1000,
                        seed: int = 0) -> np.ndarray:
    """(kinds, groups, 2): a bootstrap 95% interval of the layer where the group's average peaks, from
    resampling the facts (seeded; resamples without a token of the group are left out); -1 for a group
    no fact has."""
    sums, counts = (np.asarray(x) for x in zip(*[group_sums(e, s) for e, s in zip(effects, subjects)]))
    rng = np.random.default_rng(seed)
    kinds, groups, _ = sums.shape[1:]
    peaks = np.full((n_resamples, kinds, groups), -1)
    for r in range(n_resamples):
        pick = rng.integers(0, len(sums), len(sums))
        total = counts[pick].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums[pick].sum(axis=0) / total[None, :, None]
        has = total > 0
        peaks[r][:, has] = np.argmax(mean[:, has], axis=2)
    out = np.full((kinds, groups, 2), -1)
    for k, g in np.ndindex(kinds, groups):
        seen = peaks[:, k, g][peaks[:, k, g] >= 0]  # resamples that drew a fact with tokens in the group
        if seen.size:
            out[k, g] = np.percentile(seen, [2.5, 97.5], method="nearest")
    return out
