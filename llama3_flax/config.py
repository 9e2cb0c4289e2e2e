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


# The decoder families this port computes, and the transformers class of each. They share the
# Llama maths; what differs is a field of LlamaConfig (see `architecture`).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Fields that only the non-Llama families set; a config holding their Llama values prints without
# them, so a Llama config's repr (part of jaxedit's cache keys) does not depend on them.
_FAMILY_FIELDS = ("architecture", "sliding_window")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and constants of a Llama-architecture decoder. Hashable, so usable as a jit static arg.

    architecture: "llama" (Llama-2/3, TinyLlama, SmolLM2), "qwen2" (Qwen2/2.5: q/k/v projections with
    biases) or "mistral". sliding_window: a token sees the keys fewer than this many RoPE positions
    before its own (Mistral; Qwen2 with use_sliding_window on every layer); None: all earlier keys.
    """

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
    architecture: str = "llama"
    sliding_window: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}: expected one of {sorted(ARCHITECTURES)}")
        if self.sliding_window is not None:
            if self.architecture == "llama":
                raise ValueError("sliding_window is not part of the llama architecture (LlamaForCausalLM "
                                 "attends to every earlier token): use architecture='mistral'")
            if isinstance(self.sliding_window, bool) or int(self.sliding_window) != self.sliding_window \
                    or self.sliding_window <= 0:
                raise ValueError(f"sliding_window must be a positive number of tokens, got {self.sliding_window!r}")
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

    @property
    def qkv_bias(self) -> bool:
        """Whether the q, k and v projections add a bias (Qwen2's attention; o_proj has none)."""
        return self.architecture == "qwen2"

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if not (f.name in _FAMILY_FIELDS and getattr(self, f.name) == f.default)]
        return f"{type(self).__qualname__}({', '.join(shown)})"

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "LlamaConfig":
        """Reads a Hugging Face config dict of a Llama (Llama-2/3/3.1/3.2, TinyLlama, SmolLM2), Qwen2/2.5
        or Mistral model (old and new rope keys); the family comes from model_type / architectures.

        Keys that change the computation must be understood; unknown keys, architectures and model
        types raise ValueError naming them, so a checkpoint this port cannot reproduce is never
        silently mis-run.
        """
        hf = dict(hf)
        family = _architecture(hf)
        required = {**_HF_REQUIRED_VALUES_COMMON, **_HF_REQUIRED_VALUES[family]}
        unknown = sorted(set(hf) - _HF_KNOWN_KEYS - _HF_FAMILY_KEYS[family] - _HF_IGNORED_KEYS - set(required))
        if unknown:
            raise ValueError(f"LlamaConfig.from_hf: unsupported config keys {unknown}"
                             + (f" for model_type {family!r}" if family != "llama" else ""))
        for key, allowed in required.items():
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
            architecture=family,
            sliding_window=_sliding_window(hf, family),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaForCausalLM, Qwen2ForCausalLM or
        MistralForCausalLM (by `architecture`) reads."""
        family = {
            "llama": {"attention_bias": False, "mlp_bias": False},
            # Qwen2's window applies to layers >= max_window_layers: 0 puts it on every layer
            "qwen2": {"use_sliding_window": self.sliding_window is not None, "sliding_window": self.sliding_window,
                      "max_window_layers": 0 if self.sliding_window is not None else self.num_hidden_layers},
            "mistral": {"sliding_window": self.sliding_window},
        }[self.architecture]
        out = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "hidden_act": "silu",
            **family,
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
# Keys of one family's config class that this port reads (beyond _HF_KNOWN_KEYS).
_HF_FAMILY_KEYS = {
    "llama": set(),
    "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "mistral": {"sliding_window"},
}
# Keys whose only supported values are those this port computes.
_HF_REQUIRED_VALUES_COMMON = {"hidden_act": ("silu",)}
_HF_REQUIRED_VALUES = {
    "llama": {
        "attention_bias": (False,),  # LlamaForCausalLM's attention_bias also biases o_proj
        "mlp_bias": (False,),
        "pretraining_tp": (1,),
        "rope_interleaved": (False,),  # SmolLM2 configs say so explicitly; interleaved RoPE is another layout
    },
    "qwen2": {},
    "mistral": {},
}


def _architecture(hf: Mapping[str, Any]) -> str:
    """The family of an HF config dict from model_type and architectures ("llama" when neither is given)."""
    model_type = hf.get("model_type")
    classes = hf.get("architectures") or []
    if isinstance(classes, str):
        classes = [classes]
    by_class = {c: a for a, c in ARCHITECTURES.items()}
    supported = sorted(ARCHITECTURES.values())
    unknown = [c for c in classes if c not in by_class]
    if unknown:
        raise ValueError(f"LlamaConfig.from_hf: architecture {unknown[0]!r} is not supported (supported: {supported})")
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ValueError(f"LlamaConfig.from_hf: model_type {model_type!r} is not supported "
                         f"(supported: {sorted(ARCHITECTURES)})")
    found = {by_class[c] for c in classes} | ({model_type} if model_type is not None else set())
    if len(found) > 1:
        raise ValueError(f"LlamaConfig.from_hf: model_type {model_type!r} and architectures {list(classes)} "
                         f"name different models")
    return found.pop() if found else "llama"


def _sliding_window(hf: Mapping[str, Any], family: str) -> int | None:
    """The attention window every layer uses, or None; ValueError for windows on some layers only."""
    if family == "mistral":
        window = hf.get("sliding_window")
        return None if window is None else int(window)
    if family != "qwen2":
        return None
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is not None:  # transformers >= 5 writes the per-layer choice out; it is authoritative
        bad = sorted({t for t in types} - {"full_attention", "sliding_attention"})
        if bad or len(types) != layers:
            raise ValueError(f"LlamaConfig.from_hf: layer_types must list 'full_attention' or 'sliding_attention' "
                             f"for each of the {layers} layers, got {list(types)}")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif hf.get("use_sliding_window"):
        first = int(hf.get("max_window_layers", layers))
        sliding = list(range(first, layers))
    else:
        sliding = []
    if not sliding:
        return None
    if len(sliding) != layers:
        raise ValueError(f"LlamaConfig.from_hf: Qwen2 sliding-window attention on layers {sliding[0]}.."
                         f"{sliding[-1]} only (max_window_layers / layer_types) is not supported: this port "
                         f"applies one attention window to every layer or none")
    if hf.get("sliding_window") is None:
        raise ValueError("LlamaConfig.from_hf: use_sliding_window is set but sliding_window is missing")
    return int(hf["sliding_window"])


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


def llama3_1_8b(dtype: str = "bfloat16") -> LlamaConfig:
    """Llama-3.1-8B-Instruct: Llama-3-8B with "llama3" rope scaling to 128k positions."""
    return llama3_8b(dtype).replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                                    eos_token_id=(128001, 128008, 128009))


def llama2_7b(dtype: str = "float16") -> LlamaConfig:
    """Llama-2-7b: multi-head attention, rope theta 1e4, no scaling."""
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, dtype=dtype)


def tinyllama_1_1b(dtype: str = "bfloat16") -> LlamaConfig:
    """TinyLlama-1.1B-Chat-v1.0: Llama-2's tokenizer and rope, grouped-query attention."""
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, dtype=dtype)


def qwen2_5_7b(dtype: str = "bfloat16") -> LlamaConfig:
    """Qwen2.5-7B-Instruct: q/k/v biases, rope theta 1e6, no sliding window (use_sliding_window false)."""
    return LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, dtype=dtype,
                       architecture="qwen2")


def mistral_7b(dtype: str = "bfloat16") -> LlamaConfig:
    """Mistral-7B-v0.1: grouped-query attention with a 4096-token sliding window."""
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, dtype=dtype,
                       architecture="mistral", sliding_window=4096)


def tiny(num_attention_heads: int = 4, num_key_value_heads: int = 2, tie_word_embeddings: bool = False,
         rope_scaling: RopeScaling | None = None, num_hidden_layers: int = 2, dtype: str = "float32",
         vocab_size: int = 128, max_position_embeddings: int = 256, architecture: str = "llama",
         sliding_window: int | None = None, rope_theta: float = 500000.0) -> LlamaConfig:
    """A tiny config for logic tests (grouped-query attention by default; Llama-3-style unless
    `architecture` says "qwen2" or "mistral")."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=16 * num_attention_heads, intermediate_size=96,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=rope_theta, rope_scaling=rope_scaling,
                       tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype, architecture=architecture,
                       sliding_window=sliding_window)


PRESETS = {"llama3-8b": llama3_8b, "llama3-70b": llama3_70b, "llama3.1-8b": llama3_1_8b, "llama3.2-1b": llama3_2_1b,
           "llama2-7b": llama2_7b, "tinyllama-1.1b": tinyllama_1_1b, "qwen2.5-7b": qwen2_5_7b, "mistral-7b": mistral_7b,
           "smollm2-135m": smollm2_135m, "tiny": tiny}
