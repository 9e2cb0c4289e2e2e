"""Checkpoints that the PyTorch editing tools edited, compared with the original and with jaxedit's edit.

`compare_checkpoint` imports a Hugging Face folder that a PyTorch tool saved after editing
(`save_pretrained`; float32, float16 or bfloat16, sharded or not) and compares it with the original
weights and, optionally, with jaxedit's own edit: which tensors of which layers differ from the
original and by how much (||W_edited - W|| / ||W||), how far the two edits' deltas are apart, and
CounterFact metrics of every model from jaxedit's evaluator. A float32 original is rounded to the
checkpoint's storage dtype before comparing, so a bfloat16 export of an unedited model shows no change.
Export goes the other way with llama3_flax.checkpoint.save_hf_folder.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from llama3_flax.checkpoint import _LAYER_HF, CheckpointError, load_hf_folder
from llama3_flax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class TensorChange:
    """One tensor (one layer's slice for stacked layer parameters) that differs from the original.

    name: the Hugging Face tensor name; key: the params path ("layers.down_proj", "embed_tokens", ...);
    relative: ||edited - original|| / ||original||; delta_norm: ||edited - original||.
    """

    name: str
    key: str
    layer: int | None
    relative: float
    delta_norm: float


@dataclasses.dataclass(frozen=True)
class DeltaAgreement:
    """Two edits of one tensor: their relative changes, ||d_theirs - d_ours|| / ||d_theirs||, cosine."""

    name: str
    layer: int | None
    theirs_relative: float
    ours_relative: float
    delta_difference: float
    cosine: float


@dataclasses.dataclass(frozen=True)
class CheckpointComparison:
    changes: tuple[TensorChange, ...]
    ours_changes: tuple[TensorChange, ...] | None
    agreement: tuple[DeltaAgreement, ...] | None
    metrics: dict
    storage_dtype: str

    @property
    def changed_layers(self) -> tuple[int, ...]:
        """Layers with any changed tensor in the imported checkpoint."""
        return tuple(sorted({c.layer for c in self.changes if c.layer is not None}))

    def format(self) -> str:
        lines = [f"Imported checkpoint (stored as {self.storage_dtype}): {len(self.changes)} tensor(s) differ "
                 "from the original"]
        if self.agreement is not None:
            lines.append(f"{'tensor':<42} {'theirs dW/W':>12} {'ours dW/W':>12} {'|dT-dO|/|dT|':>13} {'cos':>7}")
            for a in self.agreement:
                lines.append(f"{a.name:<42} {a.theirs_relative:>12.4g} {a.ours_relative:>12.4g} "
                             f"{a.delta_difference:>13.4g} {a.cosine:>7.4f}")
        else:
            lines.append(f"{'tensor':<42} {'||dW||/||W||':>13} {'||dW||':>10}")
            for c in self.changes:
                lines.append(f"{c.name:<42} {c.relative:>13.4g} {c.delta_norm:>10.4g}")
        if self.metrics:
            from jaxedit.eval.tables import format_table

            lines += ["", format_table(self.metrics)]
        return "\n".join(lines)


_TOP_HF = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _tensors(params) -> list[tuple[str, str, int | None, Any]]:
    """(HF name, params key, layer, array) for every tensor (layer slices of stacked parameters)."""
    out = []
    for key, arr in params.items():
        if key == "layers":
            for sub, stacked in arr.items():
                for i in range(stacked.shape[0]):
                    out.append((f"model.layers.{i}.{_LAYER_HF[sub]}", f"layers.{sub}", i, (stacked, i)))
        else:
            out.append((_TOP_HF.get(key, key), key, None, (arr, None)))
    return out


def _get(ref):
    arr, i = ref
    return np.asarray(arr if i is None else arr[i])


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    return x


def weight_changes(original, edited, *, storage_dtype: str = "float32", threshold: float = 0.0
                   ) -> tuple[TensorChange, ...]:
    """The tensors of `edited` that differ from `original` (params trees of the same model).

    Args:
      storage_dtype: the dtype `edited` was stored in; `original` is rounded to it before comparing.
      threshold: report only tensors whose relative change exceeds this (0: any difference).
    """
    if set(original) != set(edited) or set(original.get("layers", {})) != set(edited.get("layers", {})):
        raise CheckpointError("the two parameter trees hold different tensors")
    out = []
    edited_refs = {name: ref for name, _, _, ref in _tensors(edited)}
    for name, key, layer, ref in _tensors(original):
        a = _rounded(_get(ref), storage_dtype)
        b = np.asarray(_get(edited_refs[name]), np.float32)
        if a.shape != b.shape:
            raise CheckpointError(f"tensor {name} has shape {b.shape}, the original {a.shape}")
        if np.array_equal(a, b):
            continue
        d = b.astype(np.float64) - a.astype(np.float64)
        dn = float(np.linalg.norm(d))
        rel = dn / max(float(np.linalg.norm(a.astype(np.float64))), 1e-30)
        if rel > threshold:
            out.append(TensorChange(name=name, key=key, layer=layer, relative=rel, delta_norm=dn))
    return tuple(out)


def storage_dtype(folder: str | os.PathLike) -> str:
    """The dtype of the weight tensors of an HF folder ("float32", "bfloat16" or "float16")."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    seen = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                seen.add(h.get_slice(k).get_dtype())
    if not seen:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    if len(seen) > 1:
        raise CheckpointError(f"{folder} mixes tensor dtypes {sorted(seen)}")
    code = seen.pop()
    if code not in names:
        raise CheckpointError(f"{folder}: tensor dtype {code} is not supported")
    return names[code]


def load_edited_checkpoint(folder: str | os.PathLike, cfg: LlamaConfig):
    """Params (float32) of an HF folder that must hold a model of cfg's sizes (an edit of it)."""
    edited_cfg, params = load_hf_folder(folder, dtype="float32")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings")
    diff = {s: (getattr(cfg, s), getattr(edited_cfg, s)) for s in sizes if getattr(cfg, s) != getattr(edited_cfg, s)}
    if diff:
        raise CheckpointError(f"{folder} is not the same model: " +
                              ", ".join(f"{k} {a} (original) vs {b}" for k, (a, b) in diff.items()))
    return params


def delta_agreement(original, theirs, ours, theirs_changes, ours_changes) -> tuple[DeltaAgreement, ...]:
    """Per tensor changed by either edit: how their deltas compare. Deltas are taken against the
    unrounded original: a bfloat16 checkpoint stores round(W + dW), so its delta carries ~2^-9 |W|
    of rounding (about 1e-2 of dW for a change of a quarter of W)."""
    refs = {n: (k, l, r) for n, k, l, r in _tensors(original)}
    t_refs = {n: r for n, _, _, r in _tensors(theirs)}
    o_refs = {n: r for n, _, _, r in _tensors(ours)}
    names = sorted({c.name for c in theirs_changes} | {c.name for c in ours_changes},
                   key=lambda n: (refs[n][1] if refs[n][1] is not None else -1, n))
    out = []
    for n in names:
        _, layer, ref = refs[n]
        w = _get(ref).astype(np.float64)
        dt = _get(t_refs[n]).astype(np.float64) - w
        do = _get(o_refs[n]).astype(np.float64) - w
        nt, no, nw = np.linalg.norm(dt), np.linalg.norm(do), max(np.linalg.norm(w), 1e-30)
        out.append(DeltaAgreement(name=n, layer=layer, theirs_relative=float(nt / nw), ours_relative=float(no / nw),
                                  delta_difference=float(np.linalg.norm(dt - do) / nt) if nt > 0 else float("inf"),
                                  cosine=float(np.sum(dt * do) / (nt * no)) if nt > 0 and no > 0 else 0.0))
    return tuple(out)


def compare_checkpoint(original, cfg: LlamaConfig, edited: str | os.PathLike | Mapping, *, ours=None,
                       tokenizer=None, requests: Sequence | None = None, threshold: float = 0.0
                       ) -> CheckpointComparison:
    """Compares a checkpoint edited by a PyTorch tool with the original (and with jaxedit's edit).

    Args:
      original: params of the unedited model (cfg).
      edited: an HF folder saved by the tool (or a params tree).
      ours: optional params of jaxedit's edit of the same requests.
      tokenizer, requests: if both given, CounterFact metrics of every model from jaxedit.eval.metrics.evaluate.
      threshold: ignore relative changes up to this (0: report any difference).
    Returns:
      CheckpointComparison (.changes: what differs from the original; .agreement: theirs vs ours;
      .metrics: {"original", "theirs"[, "ours"]: Aggregate}; .format() prints it).
    """
    if isinstance(edited, (str, os.PathLike)):
        dtype = storage_dtype(edited)
        theirs = load_edited_checkpoint(edited, cfg)
    else:
        dtype, theirs = "float32", edited
    changes = weight_changes(original, theirs, storage_dtype=dtype, threshold=threshold)
    ours_changes = agreement = None
    if ours is not None:
        ours_changes = weight_changes(original, ours, threshold=threshold)
        agreement = delta_agreement(original, theirs, ours, changes, ours_changes)
    rows = {}
    if tokenizer is not None and requests:
        from jaxedit.eval.metrics import evaluate

        rows["original"] = evaluate(original, cfg, tokenizer, requests).aggregate
        rows["theirs"] = evaluate(theirs, cfg, tokenizer, requests).aggregate
        if ours is not None:
            rows["ours"] = evaluate(ours, cfg, tokenizer, requests).aggregate
    return CheckpointComparison(changes=changes, ours_changes=ours_changes, agreement=agreement, metrics=rows,
                                storage_dtype=dtype)
