"""Where data and caches live: given by the caller, else by an environment variable; never derived
from where the source code sits.

  JAXEDIT_DATA   the data folder (counterfact/, corpus/, knowns/), e.g. a checkout's ../shared/data
  JAXEDIT_CACHE  downloads and on-disk caches (default ~/.cache/jaxedit)
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "JAXEDIT_DATA"
CACHE_ENV = "JAXEDIT_CACHE"


class DataFolderNotSet(FileNotFoundError):
    """No data folder was given and JAXEDIT_DATA is not set."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: `explicit` if given, else $JAXEDIT_DATA.

    Raises:
      DataFolderNotSet: neither is given (the message says what to set).
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ENV)
    if not env:
        raise DataFolderNotSet(f"no data folder: set {DATA_ENV}=/path/to/data (the folder holding counterfact/ "
                               "and corpus/) or pass the file's path explicitly")
    return Path(env).expanduser()


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder: `explicit` if given, else $JAXEDIT_CACHE, else ~/.cache/jaxedit."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxedit"


def corpus_file(name: str, data: str | os.PathLike | None = None) -> Path:
    """A corpus file named as in CovarianceHparams.corpus: an existing path as it is, else
    <data folder>/corpus/<name>."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute():
        return path
    return data_dir(data) / "corpus" / name
