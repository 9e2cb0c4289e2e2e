"""Bridges to the PyTorch editing tools: their hyperparameter files, and checkpoints they edited.

Hyperparameters
---------------
`read_hparams` / `import_hparams` read, as they are, the files of
  * EasyEdit (zjunlp/EasyEdit, hparams/{ROME,MEMIT,EMMET}/*.yaml: with `alg_name`, `model_name`,
    `device`, `stats_dir`, ...; numbers such as `5e-1` that YAML 1.1 leaves as strings are read as
    numbers, as EasyEdit does), and
  * the ROME / MEMIT / EMMET reference repositories (kmeng01/rome, kmeng01/memit,
    scalable-model-editing/unified-model-editing, hparams/{ROME,MEMIT,EMMET}/*.json: no `alg_name`;
    the method comes from the `method` argument or the file's folder name),
into a `jaxedit.hparams.EditHparams`. Every field is either used, checked to have the only value
jaxedit implements, or accepted as purely technical (devices, module paths, where statistics are
stored, ...). Anything else raises `UnsupportedHparams` naming the fields, e.g. `fact_token` other
than "subject_last", `mom2_adjustment: false`, a `v_loss_layer` that is not the model's last layer,
`update_norm_lambda` != 0, EMMET over several layers. Settings that the files do not carry (template
sampling seed, early-stop threshold, C0 sample length, ...) come from `base` (an EditHparams, e.g. a
jaxedit.hparams.preset). `hparams_to_dict` / `write_hparams` write the other way (for running the
PyTorch tools with jaxedit's settings).

Edited checkpoints
------------------
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
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from llama3_flax.checkpoint import _LAYER_HF, CheckpointError, load_hf_folder
from llama3_flax.config import LlamaConfig

from .hparams import (MEMIT_TEMPLATES, ROME_TEMPLATES, EditHparams,
                      ValueHparams)


class UnsupportedHparams(ValueError):
    """A hyperparameter file asks for something jaxedit does not implement (the message names the fields)."""


METHOD_NAMES = {"rome": "ROME", "memit": "MEMIT", "emmet": "EMMET"}

# Fields that configure where things run or live, or what gets logged: accepted, not used.
TECHNICAL_FIELDS = frozenset({
    "alg_name", "model_name", "device", "model_parallel", "stats_dir", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "max_length", "batch_size",
    "fp16", "calculate_objective_value", "dynamic_multiplier",
})

# Corpus names of the reference tools -> jaxedit.covariance corpus ids (hub "name:config").
MOM2_DATASETS = {"wikipedia": "wikipedia:20220301.en", "wikitext": "wikitext:wikitext-103-raw-v1"}

# The MLP output projection (the edited matrix) of the architectures the tools' files are written for;
# jaxedit edits its Llama counterpart, down_proj.
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")

# field -> (the only supported value, why)
_REQUIRED_VALUES = {
    "fact_token": ("subject_last", "keys and values are read at the subject's last token only"),
    "layer_selection": ("all", "every listed layer is edited"),
    "mom2_adjustment": (True, "every editor uses the preservation covariance C0"),
    "mom2_dtype": ("float32", "C0 is accumulated in float32"),
    "update_norm_lambda": (0, "EMMET's extra norm penalty on the update is not implemented"),
    "enable_prompt_keys": (False, "ROME keys are averaged over the context templates"),
    "enable_random_prefix_keys": (True, "ROME keys are averaged over the context templates"),
    "original_implementation": (False, "the original ROME mixing of prompt and prefix keys is not implemented"),
    "bias_update": (False, "only the weight matrix is edited"),
    "dynamic": (False, "dynamic multipliers are not implemented"),
}

_VALUE_FIELDS = {"v_num_grad_steps": int, "v_lr": float, "v_weight_decay": float, "clamp_norm_factor": float,
                 "kl_factor": float}


@dataclasses.dataclass(frozen=True)
class ImportedHparams:
    """An EditHparams read from a PyTorch tool's file, with what the file said besides.

    format: "easyedit-yaml", "reference-json" or "dict".
    model_name: the file's `model_name` (EasyEdit), if any.
    batch_size: EasyEdit's edits per batch (a schedule setting: use jaxedit.schedule), if given.
    ignored: technical fields accepted and not used (plus ROME's mom2_update_weight, which cancels).
    defaults: EditHparams settings the file does not carry, taken from `base`.
    """

    hparams: EditHparams
    source: str
    format: str
    model_name: str | None = None
    batch_size: int | None = None
    ignored: tuple[str, ...] = ()
    defaults: tuple[str, ...] = ()


def _load_file(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data, fmt = yaml.safe_load(text), "easyedit-yaml"
    elif path.suffix.lower() == ".json":
        data, fmt = json.loads(text), "reference-json"
    else:
        raise ValueError(f"{path}: hyperparameter files are .yaml/.yml (EasyEdit) or .json (reference repositories)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    return data, fmt


def _method_from(data: Mapping, method: str | None, path: Path | None) -> str:
    named = data.get("alg_name")
    if named is not None and not isinstance(named, str):
        raise UnsupportedHparams(f"alg_name={named!r} is not a method name")
    candidates = []
    if method is not None:
        candidates.append(("argument", method))
    if named is not None:
        candidates.append(("alg_name", named))
    if path is not None and not candidates and path.parent.name.upper() in ("ROME", "MEMIT", "EMMET"):
        candidates.append(("folder", path.parent.name))
    if not candidates:
        raise ValueError(f"{path or 'hparams'}: cannot tell the method (no alg_name, no ROME/MEMIT/EMMET folder); "
                         "pass method='rome'|'memit'|'emmet'")
    lowered = {c[1].lower() for c in candidates}
    if len(lowered) > 1:
        raise ValueError(f"{path or 'hparams'}: conflicting methods " + ", ".join(f"{w}={m!r}" for w, m in candidates))
    m = lowered.pop()
    if m not in METHOD_NAMES:
        raise UnsupportedHparams(f"alg_name={candidates[0][1]!r}: jaxedit implements ROME, MEMIT and EMMET only")
    return m


def _number(name: str, value: Any, kind: type):
    """int/float from a number or a numeric string (YAML 1.1 reads 5e-1 as a string)."""
    if isinstance(value, bool):
        raise UnsupportedHparams(f"{name}={value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UnsupportedHparams(f"{name}={value!r} is not a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsupportedHparams(f"{name}={value!r} is not a finite number")
    if kind is int:
        if float(value) != int(value):
            raise UnsupportedHparams(f"{name}={value!r} must be an integer")
        return int(value)
    return float(value)


def _same(value, wanted) -> bool:
    if isinstance(wanted, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        return value is wanted
    if isinstance(wanted, (int, float)) and not isinstance(value, bool):
        try:
            return _number("", value, float) == wanted
        except UnsupportedHparams:
            return False
    return value == wanted


def hparams_from_dict(data: Mapping[str, Any], *, method: str | None = None, cfg: LlamaConfig | None = None,
                      num_layers: int | None = None, base: EditHparams | None = None, source: str = "<dict>",
                      fmt: str = "dict", path: Path | None = None) -> ImportedHparams:
    """EditHparams from a mapping in the tools' field names (see the module docstring).

    Args:
      method: "rome" | "memit" | "emmet" when the mapping has no alg_name (must agree if it has).
      cfg / num_layers: the model the hparams are for; with it, layers and v_loss_layer are checked.
      base: where settings the file does not carry come from (default: EditHparams' defaults, with the
        method's template groups).
    Raises:
      UnsupportedHparams naming every unsupported field; ValueError for a missing method or layers.
    """
    data = dict(data)
    m = _method_from(data, method, path)
    num_layers = cfg.num_hidden_layers if cfg is not None else num_layers
    problems: list[str] = []
    ignored: list[str] = []
    used: set[str] = set()

    def problem(name, why):
        problems.append(f"{name}={data.get(name)!r} ({why})")

    def number(name, kind):
        """data[name] as a number of `kind`, marking it used; None (and a recorded problem) if not one."""
        used.add(name)
        try:
            return _number(name, data[name], kind)
        except UnsupportedHparams as e:
            problems.append(str(e))
            return None

    # --- checked-only fields
    for name, (wanted, why) in _REQUIRED_VALUES.items():
        if name in data:
            used.add(name)
            if not _same(data[name], wanted):
                problem(name, f"only {wanted!r} is supported: {why}")
    if "rewrite_module_tmp" in data:
        used.add("rewrite_module_tmp")
        tmp = str(data["rewrite_module_tmp"])
        last = tmp.rsplit(".", 1)[-1]
        if "{}" not in tmp or last not in _MLP_OUT_NAMES:
            problem("rewrite_module_tmp", "jaxedit edits the MLP output projection (Llama: model.layers.{}.mlp.down_proj)")
    # --- layers
    if "layers" not in data:
        raise ValueError(f"{source}: no 'layers' field")
    used.add("layers")
    layers = data["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        problem("layers", "must be a non-empty list of layer indices")
        layers = ()
    else:
        try:
            layers = tuple(_number("layers", l, int) for l in layers)
        except UnsupportedHparams as e:
            problems.append(str(e))
            layers = ()
    if layers and m in ("rome", "emmet") and len(layers) != 1:
        problem("layers", f"jaxedit's {METHOD_NAMES[m]} edits one layer")
    if layers and (list(layers) != sorted(set(layers))):
        problem("layers", "must be increasing and distinct")
    if layers and num_layers is not None and any(not 0 <= l < num_layers for l in layers):
        problem("layers", f"the model has layers 0..{num_layers - 1}")

    # --- value optimisation
    base = base if base is not None else EditHparams(method=m, layers=(0,),
                                                     templates=ROME_TEMPLATES if m == "rome" else MEMIT_TEMPLATES)
    value_changes = {}
    for name, kind in _VALUE_FIELDS.items():
        if name in data and (value := number(name, kind)) is not None:
            value_changes[name] = value
    if "v_loss_layer" in data and (loss_layer := number("v_loss_layer", int)) is not None:
        if loss_layer != -1 and num_layers is not None and loss_layer != num_layers - 1:
            problem("v_loss_layer", f"only the last layer ({num_layers - 1}) is supported as the loss layer")
        else:
            value_changes["v_loss_layer"] = -1 if num_layers is not None else loss_layer

    # --- covariance
    cov_changes = {}
    if "mom2_dataset" in data:
        used.add("mom2_dataset")
        ds = str(data["mom2_dataset"])
        cov_changes["corpus"] = MOM2_DATASETS.get(ds, ds)
    if "mom2_n_samples" in data and (n_samples := number("mom2_n_samples", int)) is not None:
        cov_changes["n_samples"] = n_samples

    # --- solve
    top = {}
    if "mom2_update_weight" in data and (w := number("mom2_update_weight", float)) is not None:
        if w <= 0:
            problem("mom2_update_weight", "must be positive")
        elif m == "rome":
            ignored.append("mom2_update_weight")  # ROME's rank-one update does not depend on C0's scale
        else:
            top["mom2_update_weight"] = w
    if "emmet_lambda" in data and (lam := number("emmet_lambda", float)) is not None:
        if lam < 0:
            problem("emmet_lambda", "must be >= 0")
        elif m == "emmet":
            top["emmet_lambda"] = lam
        else:
            ignored.append("emmet_lambda")

    # --- templates
    templates = base.templates
    if "context_template_length_params" in data:
        used.add("context_template_length_params")
        spec = data["context_template_length_params"]
        try:
            groups = tuple((_number("context_template_length_params", a, int),
                            _number("context_template_length_params", b, int)) for a, b in spec)
            bad = [g for g in groups if g[0] < 1 or g[1] < 1 or g[1] % 5]
            if bad or not groups:
                problem("context_template_length_params", "needs [length, count] pairs with counts that are "
                        "multiples of 5 (one per starter word)")
            else:
                templates = dataclasses.replace(base.templates, groups=groups)
        except (TypeError, ValueError) as e:
            problems.append(f"context_template_length_params={spec!r} (expected [[length, count], ...]: {e})")
    elif base.method != m:
        templates = ROME_TEMPLATES if m == "rome" else MEMIT_TEMPLATES

    # --- technical and unknown fields
    model_name = data.get("model_name")
    batch_size = None
    for name in sorted(set(data) - used):
        if name in TECHNICAL_FIELDS:
            ignored.append(name)
            if name == "batch_size":
                try:
                    batch_size = _number("batch_size", data[name], int)
                except UnsupportedHparams as e:
                    problems.append(str(e))
        else:
            problems.append(f"{name}={data[name]!r} (unknown field)")
    if problems:
        raise UnsupportedHparams(f"{source}: {METHOD_NAMES[m]} hparams jaxedit does not support: " + "; ".join(problems))

    value = dataclasses.replace(base.value, **value_changes)
    covariance = dataclasses.replace(base.covariance, **cov_changes)
    defaults = [f"value.{f}" for f in (*_VALUE_FIELDS, "v_loss_layer") if f not in data]
    defaults += ["value.early_stop_loss", "covariance.max_length", "covariance.batch_size", "templates.seed",
                 "templates.top_k"]
    defaults += [name for name, field in (("templates.groups", "context_template_length_params"),
                                          ("covariance.corpus", "mom2_dataset"),
                                          ("covariance.n_samples", "mom2_n_samples")) if field not in data]
    if m != "rome" and "mom2_update_weight" not in data:
        defaults.append("mom2_update_weight")
    if m == "emmet" and "emmet_lambda" not in data:
        defaults.append("emmet_lambda")
    try:
        hp = EditHparams(method=m, layers=layers, value=value, templates=templates, covariance=covariance,
                         mom2_update_weight=top.get("mom2_update_weight", base.mom2_update_weight),
                         emmet_lambda=top.get("emmet_lambda", base.emmet_lambda))
    except ValueError as e:
        raise UnsupportedHparams(f"{source}: {e}") from e
    return ImportedHparams(hparams=hp, source=source, format=fmt,
                           model_name=None if model_name is None else str(model_name), batch_size=batch_size,
                           ignored=tuple(ignored), defaults=tuple(defaults))


def import_hparams(path: str | os.PathLike, *, method: str | None = None, cfg: LlamaConfig | None = None,
                   num_layers: int | None = None, base: EditHparams | None = None) -> ImportedHparams:
    """Reads an EasyEdit .yaml or a reference-repository .json hparams file (see hparams_from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hyperparameter file at {path}")
    data, fmt = _load_file(path)
    return hparams_from_dict(data, method=method, cfg=cfg, num_layers=num_layers, base=base, source=str(path),
                             fmt=fmt, path=path)


def read_hparams(path: str | os.PathLike, *, method: str | None = None, cfg: LlamaConfig | None = None,
                 num_layers: int | None = None, base: EditHparams | None = None) -> EditHparams:
    """The EditHparams of an EasyEdit .yaml or a reference-repository .json hparams file."""
    return import_hparams(path, method=method, cfg=cfg, num_layers=num_layers, base=base).hparams


def hparams_to_dict(hp: EditHparams, cfg: LlamaConfig, *, fmt: str = "easyedit", model_name: str | None = None,
                    stats_dir: str = "./data/stats", device: int = 0) -> dict:
    """The tools' field names for hp on a Llama model with cfg ("easyedit" adds alg_name, model_name,
    device, stats_dir; "reference" is the repositories' JSON). Reading the result back gives hp
    (up to the settings the files cannot carry)."""
    if fmt not in ("easyedit", "reference"):
        raise ValueError(f"fmt must be 'easyedit' or 'reference', got {fmt!r}")
    v = hp.value
    if v.early_stop_loss != ValueHparams().early_stop_loss:
        raise UnsupportedHparams(f"early_stop_loss={v.early_stop_loss} cannot be written: the tools fix it at 5e-2")
    out: dict[str, Any] = {}
    if fmt == "easyedit":
        out.update(alg_name=METHOD_NAMES[hp.method], model_name=model_name or "", stats_dir=stats_dir, device=device)
    out.update(layers=list(hp.layers), fact_token="subject_last", v_num_grad_steps=v.v_num_grad_steps,
               v_lr=v.v_lr, v_loss_layer=cfg.num_hidden_layers - 1, v_weight_decay=v.v_weight_decay,
               clamp_norm_factor=v.clamp_norm_factor, kl_factor=v.kl_factor, mom2_adjustment=True)
    if hp.method == "rome":
        out["context_template_length_params"] = [list(g) for g in hp.templates.groups]
    else:
        out["layer_selection"] = "all"
        out["mom2_update_weight"] = hp.mom2_update_weight
        if hp.templates.groups != MEMIT_TEMPLATES.groups:
            raise UnsupportedHparams(f"template groups {hp.templates.groups} cannot be written for "
                                     f"{METHOD_NAMES[hp.method]}: its tools fix them at {MEMIT_TEMPLATES.groups}")
    out.update(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
               mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
               ln_f_module="model.norm",
               lm_head_module="model.embed_tokens" if cfg.tie_word_embeddings else "lm_head")
    corpus = {v: k for k, v in MOM2_DATASETS.items()}.get(hp.covariance.corpus, hp.covariance.corpus)
    out.update(mom2_dataset=corpus, mom2_n_samples=hp.covariance.n_samples, mom2_dtype="float32")
    if hp.method == "emmet":
        out.update(update_norm_lambda=0, emmet_lambda=hp.emmet_lambda)
    if fmt == "easyedit":
        out["model_parallel"] = False
    return out


def write_hparams(path: str | os.PathLike, hp: EditHparams, cfg: LlamaConfig, **kwargs) -> Path:
    """Writes hp as an EasyEdit .yaml or a reference .json (by the file suffix)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(hparams_to_dict(hp, cfg, fmt="easyedit", **kwargs), sort_keys=False)
    elif path.suffix.lower() == ".json":
        text = json.dumps(hparams_to_dict(hp, cfg, fmt="reference", **kwargs), indent=4)
    else:
        raise ValueError(f"{path}: write .yaml (EasyEdit) or .json (reference repositories)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# =============================================================================== edited checkpoints
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
            from .metrics import format_table

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
      tokenizer, requests: if both given, CounterFact metrics of every model from jaxedit.metrics.evaluate.
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
        from .metrics import evaluate

        rows["original"] = evaluate(original, cfg, tokenizer, requests).aggregate
        rows["theirs"] = evaluate(theirs, cfg, tokenizer, requests).aggregate
        if ours is not None:
            rows["ours"] = evaluate(ours, cfg, tokenizer, requests).aggregate
    return CheckpointComparison(changes=changes, ours_changes=ours_changes, agreement=agreement, metrics=rows,
                                storage_dtype=dtype)
