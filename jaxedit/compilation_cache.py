"""JAX's persistent compilation cache, on by default for the command line, the demo and the sweeps, so
a second run loads its compiled programs instead of compiling them again.

  JAXEDIT_JIT_CACHE=/path   where the compiled programs go (default <JAXEDIT_CACHE>/jit, i.e.
                            ~/.cache/jaxedit/jit)
  JAXEDIT_JIT_CACHE=off     no persistent cache ("0", "none" and "" too)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from jaxedit.data import paths

ENV = "JAXEDIT_JIT_CACHE"
_OFF = ("", "0", "off", "none", "false")


def cache_folder(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder the persistent cache would use: `explicit`, else $JAXEDIT_JIT_CACHE, else
    <cache dir>/jit; None when switched off."""
    value = str(explicit) if explicit is not None else os.environ.get(ENV)
    if value is None:
        return paths.cache_dir() / "jit"
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable(explicit: str | os.PathLike | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on (see the module docstring). Returns its folder, or
    None when it is switched off or this JAX has no such option."""
    folder = cache_folder(explicit)
    if folder is None:
        return None
    import jax

    try:
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        # Every program, however quick to compile: single edits compile many small ones.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception as e:  # an older/newer JAX without these options: run without the cache
        logging.warning("persistent compilation cache not enabled: %s", e)
        return None
    return folder
