"""The PyTorch editing tools' hyperparameter files, read into EditHparams and written from them.

Hyperparameters
---------------
`read_hparams` / `import_hparams` read, as they are, the files of
  * EasyEdit (zjunlp/EasyEdit, hparams/{ROME,MEMIT,EMMET,AlphaEdit}/*.yaml: with `alg_name`, `model_name`,
    `device`, `stats_dir`, ...; numbers such as `5e-1` that YAML 1.1 leaves as strings are read as
    numbers, as EasyEdit does), and
  * the ROME / MEMIT / EMMET / AlphaEdit reference repositories (kmeng01/rome, kmeng01/memit,
    scalable-model-editing/unified-model-editing, jianghoucheng/AlphaEdit,
    hparams/{ROME,MEMIT,EMMET,AlphaEdit}/*.json: no `alg_name`;
    the method comes from the `method` argument or the file's folder name),
into a `jaxedit.hparams.EditHparams`. Every field is either used, checked to have the only value
jaxedit implements, or accepted as purely technical (devices, module paths, where statistics are
stored, ...). ROME's `mom2_adjustment: false` (EasyEdit's ROME files) reads as C0 = I
(CovarianceHparams.identity). Anything else raises `UnsupportedHparams` naming the fields, e.g. `fact_token` other
than "subject_last", `mom2_adjustment: false` outside ROME, a `v_loss_layer` that is not the model's last layer,
`update_norm_lambda` != 0. Settings that the files do not carry (template
sampling seed, early-stop threshold, C0 sample length, ...) come from `base` (an EditHparams, e.g. a
jaxedit.hparams.preset). `hparams_to_dict` / `write_hparams` write the other way (for running the
PyTorch tools with jaxedit's settings).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from llama3_flax.config import LlamaConfig

from jaxedit.hparams import EditHparams, ValueHparams, reference_templates
from jaxedit.methods import METHODS, method as method_named


class UnsupportedHparams(ValueError):
    """A hyperparameter file asks for something jaxedit does not implement (the message names the fields)."""


# Fields that configure where things run or live, or what gets logged: accepted, not used.
TECHNICAL_FIELDS = frozenset({
    "alg_name", "model_name", "device", "model_parallel", "stats_dir", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "max_length", "batch_size",
    "fp16", "calculate_objective_value", "dynamic_multiplier", "P_loc",
})

# Corpus names of the reference tools -> jaxedit.editing.covariance corpus ids (hub "name:config").
MOM2_DATASETS = {"wikipedia": "wikipedia:20220301.en", "wikitext": "wikitext:wikitext-103-raw-v1"}

# The MLP output projection (the edited matrix) of the architectures the tools' files are written for;
# jaxedit edits its Llama counterpart, down_proj.
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")

# field -> (the only supported value, why)
_REQUIRED_VALUES = {
    "fact_token": ("subject_last", "keys and values are read at the subject's last token only"),
    "layer_selection": ("all", "every listed layer is edited"),
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
    batch_size: EasyEdit's edits per batch (a schedule setting: use jaxedit.editing.schedule), if given.
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
    if path is not None and not candidates and path.parent.name.lower() in METHODS:
        candidates.append(("folder", path.parent.name))
    if not candidates:
        raise ValueError(f"{path or 'hparams'}: cannot tell the method (no alg_name, no ROME/MEMIT/EMMET/AlphaEdit "
                         "folder); pass method='rome'|'memit'|'emmet'|'alphaedit'")
    lowered = {c[1].lower() for c in candidates}
    if len(lowered) > 1:
        raise ValueError(f"{path or 'hparams'}: conflicting methods " + ", ".join(f"{w}={m!r}" for w, m in candidates))
    m = lowered.pop()
    if m not in METHODS:
        raise UnsupportedHparams(f"alg_name={candidates[0][1]!r}: jaxedit implements ROME, MEMIT, EMMET and AlphaEdit only")
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
      method: "rome" | "memit" | "emmet" | "alphaedit" when the mapping has no alg_name (must agree if
        it has).
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
    if "mom2_adjustment" in data:
        used.add("mom2_adjustment")
        if not (_same(data["mom2_adjustment"], True) or _same(data["mom2_adjustment"], False)):
            problem("mom2_adjustment", "must be true or false")
        elif _same(data["mom2_adjustment"], False) and m != "rome":
            # the tools' MEMIT, EMMET and AlphaEdit never read the field: they always use C0
            problem("mom2_adjustment", "only ROME runs without C0 (C0 = I); MEMIT, EMMET and AlphaEdit always use it")
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
    limit = method_named(m).max_layers
    if layers and limit is not None and len(layers) > limit:
        problem("layers", f"jaxedit's {method_named(m).title} edits at most {limit} layer(s)")
    if layers and (list(layers) != sorted(set(layers))):
        problem("layers", "must be increasing and distinct")
    if layers and num_layers is not None and any(not 0 <= l < num_layers for l in layers):
        problem("layers", f"the model has layers 0..{num_layers - 1}")

    # --- value optimisation
    base = base if base is not None else EditHparams(method=m, layers=(0,), templates=reference_templates(m))
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
    if "mom2_adjustment" in data:
        cov_changes["identity"] = _same(data["mom2_adjustment"], False)
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
        elif not method_named(m).uses_preservation_weight:
            ignored.append("mom2_update_weight")  # ROME's rank-one update does not depend on C0's scale
        else:
            top["mom2_update_weight"] = w
    if "emmet_lambda" in data and (lam := number("emmet_lambda", float)) is not None:
        if lam < 0:
            problem("emmet_lambda", "must be >= 0")
        elif method_named(m).uses_emmet_lambda:
            top["emmet_lambda"] = lam
        else:
            ignored.append("emmet_lambda")

    for field, name in (("nullspace_threshold", "nullspace_threshold"), ("L2", "l2")):
        if field in data and (x := number(field, float)) is not None:
            if x <= 0:
                problem(field, "must be > 0")
            elif method_named(m).uses_null_space:
                top[name] = x
            else:
                ignored.append(field)

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
        templates = reference_templates(m)

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
        raise UnsupportedHparams(f"{source}: {method_named(m).title} hparams jaxedit does not support: " + "; ".join(problems))

    value = dataclasses.replace(base.value, **value_changes)
    covariance = dataclasses.replace(base.covariance, **cov_changes)
    defaults = [f"value.{f}" for f in (*_VALUE_FIELDS, "v_loss_layer") if f not in data]
    defaults += ["value.early_stop_loss", "covariance.max_length", "covariance.batch_size", "templates.seed",
                 "templates.top_k"]
    defaults += [name for name, field in (("templates.groups", "context_template_length_params"),
                                          ("covariance.corpus", "mom2_dataset"),
                                          ("covariance.n_samples", "mom2_n_samples")) if field not in data]
    if method_named(m).uses_preservation_weight and "mom2_update_weight" not in data:
        defaults.append("mom2_update_weight")
    if method_named(m).uses_emmet_lambda and "emmet_lambda" not in data:
        defaults.append("emmet_lambda")
    if method_named(m).uses_null_space:
        defaults += [name for name, field in (("nullspace_threshold", "nullspace_threshold"), ("l2", "L2"))
                     if field not in data]
    try:
        hp = EditHparams(method=m, layers=layers, value=value, templates=templates, covariance=covariance,
                         mom2_update_weight=top.get("mom2_update_weight", base.mom2_update_weight),
                         emmet_lambda=top.get("emmet_lambda", base.emmet_lambda),
                         nullspace_threshold=top.get("nullspace_threshold", base.nullspace_threshold),
                         l2=top.get("l2", base.l2))
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
    if hp.covariance.identity and hp.method != "rome":
        raise UnsupportedHparams(f"covariance.identity cannot be written for {hp.spec.title}: only the tools' ROME "
                                 "runs without C0 (mom2_adjustment: false)")
    if v.early_stop_loss != ValueHparams().early_stop_loss:
        raise UnsupportedHparams(f"early_stop_loss={v.early_stop_loss} cannot be written: the tools fix it at 5e-2")
    out: dict[str, Any] = {}
    if fmt == "easyedit":
        out.update(alg_name=hp.spec.title, model_name=model_name or "", stats_dir=stats_dir, device=device)
    out.update(layers=list(hp.layers), fact_token="subject_last", v_num_grad_steps=v.v_num_grad_steps,
               v_lr=v.v_lr, v_loss_layer=cfg.num_hidden_layers - 1, v_weight_decay=v.v_weight_decay,
               clamp_norm_factor=v.clamp_norm_factor, kl_factor=v.kl_factor,
               mom2_adjustment=not hp.covariance.identity)
    if hp.method == "rome":  # only the ROME tools read their template groups from the file
        out["context_template_length_params"] = [list(g) for g in hp.templates.groups]
    else:
        out["layer_selection"] = "all"
        out["mom2_update_weight"] = hp.mom2_update_weight
        if hp.templates.groups != reference_templates(hp.method).groups:
            raise UnsupportedHparams(f"template groups {hp.templates.groups} cannot be written for "
                                     f"{hp.spec.title}: its tools fix them at {reference_templates(hp.method).groups}")
    out.update(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
               mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
               ln_f_module="model.norm",
               lm_head_module="model.embed_tokens" if cfg.tie_word_embeddings else "lm_head")
    corpus = {v: k for k, v in MOM2_DATASETS.items()}.get(hp.covariance.corpus, hp.covariance.corpus)
    out.update(mom2_dataset=corpus, mom2_n_samples=hp.covariance.n_samples, mom2_dtype="float32")
    if hp.spec.uses_emmet_lambda:
        out.update(update_norm_lambda=0, emmet_lambda=hp.emmet_lambda)
    if hp.spec.uses_null_space:
        out.update(nullspace_threshold=hp.nullspace_threshold, L2=hp.l2)
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
