"""Params -> a llama.cpp-compatible GGUF file (the inverse of checkpoint.load_gguf).

`save_gguf` writes llama.cpp's "llama" architecture (Llama, and Mistral as llama.cpp converts it:
q/k rows in its interleaved rotary order) or "qwen2" (q/k rows as transformers has them, q/k/v
biases), the tensors under llama.cpp's names, norms in float32 as llama.cpp keeps them, matrices in F32,
F16, BF16 or Q8_0, and the tokenizer: carried over from a source GGUF file (every `tokenizer.*`
key, chat template included) or built from a Hugging Face BPE tokenizer. The file appears whole or
not at all (temp file in the same folder, then os.replace).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import _LAYER_HF, gguf_architecture, gguf_permutes_rope, gguf_tensor_names
from .config import LlamaConfig
from .model import Params, layer_param_names, param_shapes

DTYPES = ("float32", "float16", "bfloat16", "q8_0")

# llama.cpp token types (llama_token_type / gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


class GGUFExportError(ValueError):
    """Params, config or tokenizer that cannot be written as a llama.cpp GGUF file."""


@dataclasses.dataclass(frozen=True)
class TokenizerMetadata:
    """The `tokenizer.*` GGUF keys: {key: (value, value type, array element type or None)}."""

    fields: tuple[tuple[str, Any, Any, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v, _, _ in self.fields}


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate-half layout -> interleaved rotary pairs).

    The inverse of checkpoint._unpermute_rope: llama.cpp rotates adjacent pairs of rows, transformers
    (and this model) the two halves of each head.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freq_factors(cfg: LlamaConfig) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for Llama-3 "llama3" rope scaling, or None without scaling.

    llama.cpp divides each base frequency by its factor, so the factors are the ratio of the unscaled
    to the scaled inverse frequencies our forward uses.
    """
    if cfg.rope_scaling is None:
        return None
    from .math import rope_inverse_frequencies

    scaled = np.asarray(rope_inverse_frequencies(cfg), np.float64)
    base = np.asarray(rope_inverse_frequencies(cfg.replace(rope_scaling=None)), np.float64)
    return (base / scaled).astype(np.float32)


# ------------------------------------------------------------------ tokenizer
def tokenizer_from_gguf(path: str | os.PathLike) -> TokenizerMetadata:
    """Every `tokenizer.*` field of a GGUF file, with its value types, for copying into another file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFExportError(f"tokenizer source {path} is not a file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, ... on bad bytes)
        raise GGUFExportError(f"cannot read tokenizer source {path}: {type(e).__name__}: {e}") from e
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            raise GGUFExportError(f"{path}: tokenizer field {key} is a nested array, which is not supported")
        fields.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in fields):
        raise GGUFExportError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens field)")
    return TokenizerMetadata(tuple(fields))


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizers pre-tokenizer ("default" when not recognised).

    llama.cpp picks its regex by this name; it cannot be read from the tokenizer object, so the
    layouts of the Llama-3, SmolLM2 and GPT-2 tokenizer.json files are recognised here.
    """
    if not pre:
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"]:
            regex = parts[0].get("pattern", {}).get("Regex", "")
            if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)") and "\\p{N}{1,3}" in regex:
                return "llama-bpe"
            if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)") and "\\p{N}|" in regex:
                return "qwen2"  # Llama-3's split with single digits
    return "default"


def tokenizer_from_hf(tokenizer, vocab_size: int) -> TokenizerMetadata:
    """GGUF tokenizer fields ("gpt2" byte-level BPE) from a Hugging Face fast tokenizer.

    Ids between the tokenizer's size and vocab_size become unused "[PAD<id>]" tokens, as llama.cpp's
    converter writes them: llama.cpp takes its vocabulary size from the token list.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"tokenizer {type(tokenizer).__name__} has no backend_tokenizer: only fast "
                              f"(tokenizers-library) BPE tokenizers can be written to GGUF")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model type {model.get('type')!r} is not supported: only byte-level BPE "
                              f"(Llama-3, SmolLM2, GPT-2 style) tokenizers can be written as tokenizer.ggml.model gpt2")
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer files)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    V, A = gguf.GGUFValueType, gguf.GGUFValueType.ARRAY
    fields: list[tuple] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", _pre_tokenizer_name(spec.get("pre_tokenizer")), V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, A, V.STRING),
        ("tokenizer.ggml.token_type", types, A, V.INT32),
        ("tokenizer.ggml.merges", merges, A, V.STRING),
        # the HF tokenizer adds BOS in its post-processor; llama.cpp needs to be told
        ("tokenizer.ggml.add_bos_token", bool(bos is not None and probe[:1] == [bos]), V.BOOL, None),
    ]
    for key, value in (("bos", bos), ("eos", tokenizer.eos_token_id), ("unknown", tokenizer.unk_token_id),
                       ("padding", tokenizer.pad_token_id)):
        if value is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(value), V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: llama.cpp's keys are chat_template and chat_template.<name>
        for name, text in template.items():
            key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
            fields.append((key, text, V.STRING, None))
    elif template:
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    return TokenizerMetadata(tuple(fields))


def _tokenizer_metadata(source, vocab_size: int) -> TokenizerMetadata:
    if isinstance(source, TokenizerMetadata):
        meta = source
    elif isinstance(source, (str, os.PathLike)):
        if Path(source).suffix != ".gguf":
            raise GGUFExportError(f"tokenizer_source {source} is not a .gguf file; pass a GGUF file to copy the "
                                  f"tokenizer from, or a Hugging Face tokenizer object")
        meta = tokenizer_from_gguf(source)
    else:
        meta = tokenizer_from_hf(source, vocab_size)
    n_tokens = len(meta.as_dict().get("tokenizer.ggml.tokens", ()))
    if n_tokens != vocab_size:
        raise GGUFExportError(f"the tokenizer lists {n_tokens} tokens but the model's vocab_size is {vocab_size}: "
                              f"llama.cpp needs one token per embedding row; use the model's own tokenizer")
    return meta


def _special_token_ids(cfg: LlamaConfig, tokenizer_ids: dict[str, Any]) -> dict[str, int]:
    """bos/eos/padding ids: the config's where it has them (load_gguf reads them back into the config)."""
    eos = cfg.eos_token_id
    if isinstance(eos, tuple):  # GGUF has one eos id; keep the tokenizer's if it is one of the model's
        eos = tokenizer_ids.get("eos") if tokenizer_ids.get("eos") in eos else eos[0]
    out = {"bos": cfg.bos_token_id, "eos": eos, "padding": cfg.pad_token_id}
    return {k: int(v) for k, v in out.items() if v is not None}


# ------------------------------------------------------------------ tensors
def _check_params(params: Params, cfg: LlamaConfig) -> None:
    """What load_gguf would refuse of the written file (checkpoint.check_writable_model: params of
    cfg's shapes, finite weights), as GGUFExportError. The tokenizer is checked by _tokenizer_metadata."""
    from .checkpoint import CheckpointError, check_writable_model

    try:
        check_writable_model(cfg, params)
    except CheckpointError as e:
        raise GGUFExportError(str(e)) from None


def _named_tensors(params: Params, cfg: LlamaConfig):
    """(llama.cpp name, float32 array, is_norm) in llama.cpp's order."""
    f32 = lambda a: np.asarray(np.asarray(a), np.float32)  # noqa: E731  (bfloat16 params go through ml_dtypes)
    yield "token_embd.weight", f32(params["embed_tokens"]), False
    layers = {k: f32(v) for k, v in params["layers"].items()}
    by_hf = {hf: name for name, hf in gguf_tensor_names(cfg).items()}
    for i in range(cfg.num_hidden_layers):
        for key in layer_param_names(cfg):
            w = layers[key][i]
            if gguf_permutes_rope(cfg) and key == "q_proj":
                w = permute_rope(w, cfg.num_attention_heads)
            elif gguf_permutes_rope(cfg) and key == "k_proj":
                w = permute_rope(w, cfg.num_key_value_heads)
            yield by_hf[f"model.layers.{i}.{_LAYER_HF[key]}"], w, key.endswith("layernorm")
    yield "output_norm.weight", f32(params["norm"]), True
    if not cfg.tie_word_embeddings:
        yield "output.weight", f32(params["lm_head"]), False
    factors = rope_freq_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", factors, True


def _encode(name: str, w: np.ndarray, is_norm: bool, dtype: str):
    """(array to write, raw GGML type or None): norms and vectors stay F32, as llama.cpp keeps them."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if is_norm or w.ndim < 2 or dtype == "float32":
        return np.ascontiguousarray(w, np.float32), None
    if dtype == "float16":
        return np.ascontiguousarray(w, np.float16), None
    qtype = Q.BF16 if dtype == "bfloat16" else Q.Q8_0
    if dtype == "q8_0" and w.shape[-1] % 32:
        raise GGUFExportError(f"tensor {name} has rows of {w.shape[-1]} values; Q8_0 needs a multiple of 32")
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype), qtype


def _check_dtype(dtype: str) -> None:
    import gguf

    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16" and not (hasattr(gguf.GGMLQuantizationType, "BF16")
                                    and hasattr(gguf.quants, "BF16")):
        raise GGUFExportError(f"the installed gguf package ({getattr(gguf, '__version__', 'unknown version')}) "
                              f"cannot write BF16 tensors; upgrade it (pip install -U gguf) or use float16")


_FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# ------------------------------------------------------------------ writing
def save_gguf(path: str | os.PathLike, params: Params, cfg: LlamaConfig, *, tokenizer_source,
              dtype: str = "float32", name: str | None = None) -> Path:
    """Writes params as a llama.cpp GGUF file and returns its path.

    tokenizer_source: a .gguf file whose `tokenizer.*` fields (vocabulary, merges, special ids, chat
    template) are copied, a Hugging Face fast BPE tokenizer, or a TokenizerMetadata. dtype: the type
    of the matrices ("float32", "float16", "bfloat16" or "q8_0"); norms are always float32.
    A sliding window is written as `llama.attention.sliding_window` (or qwen2.…), which load_gguf
    reads back; llama.cpp's llama and qwen2 architectures attend to every earlier token regardless,
    as they do for the files its own converter writes from Mistral and Qwen2 checkpoints.
    """
    import gguf

    _check_dtype(dtype)
    _check_params(params, cfg)
    if cfg.rope_scaling is not None and gguf_architecture(cfg) != "llama":
        raise GGUFExportError(f"llama.cpp's {gguf_architecture(cfg)} architecture reads no rope frequency factors "
                              f"(rope_freqs.weight): a {cfg.architecture} config with 'llama3' rope scaling cannot "
                              f"be written as GGUF")
    path = Path(path)
    if path.suffix != ".gguf":
        raise GGUFExportError(f"{path}: a GGUF file name must end in .gguf (load_model tells files by it)")
    if not path.parent.is_dir():
        raise GGUFExportError(f"folder {path.parent} does not exist")
    if path.is_dir():
        raise GGUFExportError(f"{path} is a folder; a GGUF file cannot replace it")
    tok = _tokenizer_metadata(tokenizer_source, cfg.vocab_size)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf_architecture(cfg))
        try:
            _add_metadata(writer, cfg, tok, dtype, name)
            for tname, w, is_norm in _named_tensors(params, cfg):
                data, raw = _encode(tname, w, is_norm, dtype)
                writer.add_tensor(tname, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _add_metadata(writer, cfg: LlamaConfig, tok: TokenizerMetadata, dtype: str, name: str | None) -> None:
    import gguf

    writer.add_type("model")
    if name is None and cfg.architecture == "mistral":
        name = "mistral"  # llama.cpp writes Mistral as "llama"; transformers' loader tells them apart by name
    if name:
        writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if cfg.sliding_window is not None:  # read back by checkpoint.load_gguf
        writer.add_sliding_window(int(cfg.sliding_window))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama.cpp reads Llama-3 rope scaling from the rope_freqs.weight tensor, not from metadata

    ids = {k: tok.as_dict().get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    special = _special_token_ids(cfg, ids)
    for key, value, vtype, sub in tok.fields:
        short = key.removeprefix("tokenizer.ggml.").removesuffix("_token_id")
        if key.endswith("_token_id") and short in special:
            continue
        if sub is not None and len(value) == 0:  # GGUF has no empty arrays (the writer refuses them)
            continue
        writer.add_key_value(key, value, vtype, sub)
    for short, value in special.items():
        writer.add_uint32(f"tokenizer.ggml.{short}_token_id", value)
