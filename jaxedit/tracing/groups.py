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


def average_by_group(effects: Sequence[np.ndarray], subjects: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Indirect effects (kinds, L, T_f) of several facts, averaged over every (fact, token) of each group.

    Returns:
      (kinds, groups, L) averages (NaN for a group no fact has) and (groups,) token counts.
    """
    if not effects:
        raise ValueError("no traced facts to average")
    kinds, layers = effects[0].shape[:2]
    sums = np.zeros((kinds, len(TOKEN_GROUPS), layers))
    counts = np.zeros(len(TOKEN_GROUPS), np.int64)
    for effect, subject in zip(effects, subjects):
        for g, tokens in enumerate(token_groups(subject, effect.shape[2])):
            sums[:, g] += effect[:, :, list(tokens)].sum(axis=2)
            counts[g] += len(tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[None, :, None], counts
