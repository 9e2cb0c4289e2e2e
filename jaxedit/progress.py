"""Progress bars for long loops (tqdm), shown when asked or when the loop is long."""
from __future__ import annotations

from typing import Iterable


def progress_bar(items: Iterable, enabled: bool | None, desc: str, threshold: int = 8):
    """`items` wrapped in a tqdm bar if enabled, or if enabled is None and there are more than `threshold`."""
    items = list(items)
    if enabled or (enabled is None and len(items) > threshold):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc)
    return items
