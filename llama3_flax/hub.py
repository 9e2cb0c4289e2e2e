"""Hugging Face hub ids ("owner/name") -> a local HF folder, through huggingface_hub's cache.

`resolve_model` downloads only what loading needs (config, tokenizer files, safetensors weights) into
the cache under HF_HOME (or HF_HUB_CACHE), and with HF_HUB_OFFLINE set looks in that cache alone.
Both variables are read when it is called, not when huggingface_hub is imported, so a program (or a
test) that sets them after start-up is obeyed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

# What load_model reads from an HF folder; everything else in a repo (GGUF copies, PyTorch .bin
# duplicates, original/ checkpoints) is skipped.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                  "*.safetensors", "*.safetensors.index.json")
# Files in subfolders (e.g. Meta's original/ consolidated checkpoints) are never what load_model reads.
IGNORE_PATTERNS = ("*/*",)

# owner/name as the hub spells repo ids: letters, digits, '-', '_', '.', not starting with a symbol.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(FileNotFoundError):
    """A hub model that cannot be had: not cached while offline, not found, gated, or incomplete."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether source names a hub repo: "owner/name" that is not an existing local path or a .gguf name."""
    text = os.fspath(source)
    return bool(_HUB_ID.match(text)) and not text.endswith(".gguf") and not Path(text).exists()


def is_offline(env: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The hub cache folder huggingface_hub uses: HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    def expand(p):
        return Path(os.path.expandvars(os.path.expanduser(p)))

    if env.get("HF_HUB_CACHE"):
        return expand(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    return expand(xdg) / "huggingface" / "hub"


def _advice(repo_id: str) -> str:
    return (f"To get it: with internet access, set HF_HUB_OFFLINE=0 (or unset it) and run again; or download it "
            f"beforehand with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) "
            f"using the same HF_HOME; or pass a local HF folder (config.json + *.safetensors + tokenizer files) "
            f"or a .gguf file instead of the hub id.")


def resolve_model(source: str, *, revision: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The local snapshot folder of hub repo `source` ("owner/name"), downloaded if needed and allowed.

    Raises HubModelError saying what to do when the model is not cached while offline, is not found
    or gated online, or its snapshot lacks config.json or safetensors weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    env = os.environ if env is None else env
    if not _HUB_ID.match(str(source)):
        raise ValueError(f"{source!r} is not a hub id of the form owner/name")
    offline, cache = is_offline(env), hub_cache_dir(env)
    try:
        folder = Path(snapshot_download(
            str(source), revision=revision, cache_dir=cache, local_files_only=offline,
            allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS)))
    except GatedRepoError as e:
        raise HubModelError(
            f"{source} is a gated model: accept its licence on https://huggingface.co/{source} and log in "
            f"(`hf auth login`, or set HF_TOKEN) before loading it. ({e})") from e
    except RepositoryNotFoundError as e:
        raise HubModelError(
            f"{source} was not found on the Hugging Face hub (misspelt, or private: log in with `hf auth login` "
            f"or set HF_TOKEN). If it is a local folder, pass its path (e.g. ./{source}). ({e})") from e
    except LocalEntryNotFoundError as e:  # not cached, and offline or the hub unreachable
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise HubModelError(f"{source} is not in the Hugging Face cache at {cache} and {why}. "
                            f"{_advice(source)}") from e
    missing = [what for what, ok in (("config.json", (folder / "config.json").is_file()),
                                     ("*.safetensors weights", any(folder.glob("*.safetensors"))))
               if not ok]
    if missing:
        raise HubModelError(
            f"the cached snapshot of {source} at {folder} has no {' and no '.join(missing)}: the download was "
            f"partial, or the repo holds no transformers safetensors checkpoint (a GGUF-only repo: download the "
            f".gguf file and pass its path). {_advice(source)}")
    return folder
