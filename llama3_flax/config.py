"""Model configuration: a frozen dataclass, read from Hugging Face config dicts, with presets."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style ("llama3") rotary frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and constants of a Llama-architecture decoder. Hashable, so usable as a jit static arg."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # dtype of the parameters and activations

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "LlamaConfig":
        """Reads a Hugging Face Llama config dict (Llama-3, 3.1/3.2, SmolLM2; old and new rope keys).

        Keys that change the computation must be understood; unknown keys raise ValueError, so a
        checkpoint this port cannot reproduce is never silently mis-run.
        """
        hf = dict(hf)
        unknown = sorted(set(hf) - _HF_KNOWN_KEYS - _HF_IGNORED_KEYS - set(_HF_REQUIRED_VALUES))
        if unknown:
            raise ValueError(f"LlamaConfig.from_hf: unsupported config keys {unknown}")
        for key, allowed in _HF_REQUIRED_VALUES.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(
                    f"LlamaConfig.from_hf: {key}={hf[key]!r} is not supported (expected one of {allowed})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"LlamaConfig.from_hf: missing required keys {missing}")

        # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_scaling = _parse_rope_scaling(scaling) if scaling else None

        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaForCausalLM reads."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }
        return out


def _parse_rope_scaling(scaling: Mapping[str, Any]) -> RopeScaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"LlamaConfig.from_hf: rope scaling type {kind!r} is not supported (only 'llama3')")
    allowed = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"}
    extra = sorted(set(scaling) - allowed)
    if extra:
        raise ValueError(f"LlamaConfig.from_hf: unsupported rope scaling keys {extra}")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


_HF_KNOWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
}
# Metadata and training-only settings: they do not change inference.
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "use_cache", "attention_dropout", "_name_or_path", "_model_name_or_path", "unk_token_id",
    "quantization_config", "output_attentions", "output_hidden_states", "return_dict",
    "is_decoder", "tokenizer_class", "use_return_dict",
    "is_llama_config", "transformers.js_config",  # written by SmolLM2's exporter
}
# Keys whose only supported values are those of the Llama architecture.
_HF_REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "rope_interleaved": (False,),  # SmolLM2 configs say so explicitly; interleaved RoPE is another layout
}


# ---------------------------------------------------------------------- presets
def llama3_8b(dtype: str = "bfloat16") -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_id=128001, dtype=dtype)


def llama3_70b(dtype: str = "bfloat16") -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_id=128001, dtype=dtype)


def llama3_2_1b(dtype: str = "bfloat16") -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                       tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000,
                       eos_token_id=128001, dtype=dtype)


def smollm2_135m(dtype: str = "float32") -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype)


def tiny(num_attention_heads: int = 4, num_key_value_heads: int = 2, tie_word_embeddings: bool = False,
         rope_scaling: RopeScaling | None = None, num_hidden_layers: int = 2, dtype: str = "float32",
         vocab_size: int = 128, max_position_embeddings: int = 256) -> LlamaConfig:
    """A tiny Llama-3-style config for logic tests (grouped-query attention by default)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=16 * num_attention_heads, intermediate_size=96,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=rope_scaling,
                       tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)


PRESETS = {"llama3-8b": llama3_8b, "llama3-70b": llama3_70b, "llama3.2-1b": llama3_2_1b, "smollm2-135m": smollm2_135m, "tiny": tiny}
