"""A Flax/JAX port of the Llama-3 family, as pure functions of a parameter pytree."""
from .config import LlamaConfig, RopeScaling, PRESETS
from .model import (Capture, Captured, DownProjUpdates, Injection, Params, forward, init_params,
                    logits_from_hidden, residual_before, run_layers)
from .checkpoint import (CheckpointError, load_gguf, load_hf_folder, load_model, load_tokenizer,
                         save_hf_folder, smollm2_gguf_path)
from .modules import LlamaForCausalLM

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "Capture", "Captured", "DownProjUpdates", "Injection",
           "Params", "forward", "init_params", "logits_from_hidden", "residual_before", "run_layers", "CheckpointError",
           "load_gguf", "load_hf_folder", "load_model", "load_tokenizer", "save_hf_folder",
           "smollm2_gguf_path", "LlamaForCausalLM"]
