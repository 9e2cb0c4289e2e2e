"""Hyperparameters as frozen dataclasses, with presets per model."""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers

from jaxedit.methods import Method, method as method_named

logger = logging.getLogger(__name__)


def _finite(owner: str, name: str, value, *, positive: bool = False, minimum: float | None = None):
    """Raises ValueError unless value is a finite real number (> 0 / >= minimum when asked)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and minimum is not None:
        ok = value >= minimum
    if not ok:
        need = "a finite number" + (" > 0" if positive else f" >= {minimum:g}" if minimum is not None else "")
        raise ValueError(f"{owner}.{name} must be {need}, got {value!r}")


def _whole(owner: str, name: str, value, minimum: int) -> int:
    """An integer field: ints (and integral numpy ints) >= minimum; 1.5, True or "3" are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ValueHparams:
    """The target-value optimisation shared by all editors (names follow the reference implementations).

    v_loss_layer: layer whose output feeds the NLL (-1: the last layer; only the last layer is
      supported, as in the paper's Llama-3 runs).
    most_probable_stop: ENCORE's most-probable early stopping: a request stops as soon as every token
      of its target is the most probable one (teacher forced) on all its rewriting prompts, instead
      of driving the target's probability towards 1 (early_stop_loss still applies).
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    most_probable_stop: bool = False

    def __post_init__(self):
        _whole("ValueHparams", "v_num_grad_steps", self.v_num_grad_steps, 1)
        if not isinstance(self.most_probable_stop, bool):
            raise ValueError(f"ValueHparams.most_probable_stop must be True or False, got {self.most_probable_stop!r}")
        if isinstance(self.v_loss_layer, bool) or not isinstance(self.v_loss_layer, int):
            raise ValueError(f"ValueHparams.v_loss_layer must be an integer layer index, got {self.v_loss_layer!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            _finite("ValueHparams", name, getattr(self, name), positive=True)
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            _finite("ValueHparams", name, getattr(self, name), minimum=0.0)


@dataclasses.dataclass(frozen=True)
class TemplateHparams:
    """Context templates: "{}" plus sampled prefixes, as (prefix length in tokens, how many) groups."""

    groups: tuple[tuple[int, int], ...] = ((10, 5),)
    seed: int = 0
    top_k: int = 5

    def __post_init__(self):
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            if len(g) != 2:
                raise ValueError(f"TemplateHparams.groups must be (length, count) pairs, got {self.groups!r}")
            _whole("TemplateHparams", "groups length", g[0], 1)
            _whole("TemplateHparams", "groups count", g[1], 1)
        object.__setattr__(self, "groups", groups)
        _whole("TemplateHparams", "top_k", self.top_k, 1)


PRODUCT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class CovarianceHparams:
    """Where the preservation covariance C0 comes from (jaxedit.editing.covariance.preservation_covariance).

    corpus: a local text file, a bare file name looked up in the data folder's corpus/ (JAXEDIT_DATA),
      or a Hugging Face dataset id "name[:config]".
    n_samples: token samples (documents, then later chunks); max_length: tokens per sample at most;
    batch_size: rows of max_length token slots per forward pass (samples are packed into rows).
    product_dtype: "float32", or "bfloat16": keys rounded to bfloat16 before the outer product, sums
      in float32 (the tensor-core rate on accelerators; over 100 SmolLM2 samples the C0 differs from
      float32's by 1.7e-4 (layer 20) to 4.0e-4 (layer 3) relative, with a diagonal bias of -2.7e-6 to
      -7.5e-6; cached apart from float32).
    identity: C0 = I, no corpus pass: ROME without its second-moment adjustment (EasyEdit's ROME files,
      `mom2_adjustment: false`), whose update is (v - W k) k^T / (k^T k).
    """

    corpus: str = "wikitext-103-valid.tokens"
    n_samples: int = 1000
    max_length: int = 128
    batch_size: int = 8
    product_dtype: str = "float32"
    identity: bool = False

    def __post_init__(self):
        for name in ("n_samples", "max_length", "batch_size"):
            _whole("CovarianceHparams", name, getattr(self, name), 1)
        if not isinstance(self.identity, bool):
            raise ValueError(f"CovarianceHparams.identity must be True or False, got {self.identity!r}")
        if self.product_dtype not in PRODUCT_DTYPES:
            raise ValueError(f"CovarianceHparams.product_dtype must be one of {PRODUCT_DTYPES}, got "
                             f"{self.product_dtype!r}")


@dataclasses.dataclass(frozen=True)
class EditHparams:
    """One editor's settings.

    method: "rome" | "memit" | "emmet".
    layers: layers whose down_proj is edited (ROME: one; MEMIT, EMMET, AlphaEdit: one or several).
    mom2_update_weight: lambda, the weight of preservation (MEMIT and EMMET scale C0 by it).
    emmet_lambda: EMMET's ridge on K^T C^-1 K, keeping the equality-constrained solve stable.
    nullspace_threshold: AlphaEdit: C0's eigenvalues below it span the directions the update may use.
    l2: AlphaEdit's ridge on the update (the reference code's L2).
    norm_constraint: ENCORE's Frobenius-norm constraint, the weight of ||dW||_F^2 added to the
      objective (0: none). The closed form keeps its shape: ROME, MEMIT and EMMET solve with
      C0 + (norm_constraint / mom2_update_weight) I in place of C0 (see jaxedit.editing.pm);
      AlphaEdit's l2 already weighs ||dW||_F^2, so the two add.
    """

    method: str
    layers: tuple[int, ...]
    value: ValueHparams = ValueHparams()
    templates: TemplateHparams = TemplateHparams()
    covariance: CovarianceHparams = CovarianceHparams()
    mom2_update_weight: float = 15000.0
    emmet_lambda: float = 0.1
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    norm_constraint: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "method", method_named(self.method).name)
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ValueError(f"EditHparams.layers must be a sequence of layer indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(_whole("EditHparams", "layers", l, 0) for l in self.layers))
        if not self.layers:
            raise ValueError("EditHparams.layers is empty")
        self.spec.check_layers(self.layers)
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        _finite("EditHparams", "mom2_update_weight", self.mom2_update_weight, positive=True)
        _finite("EditHparams", "emmet_lambda", self.emmet_lambda, minimum=0.0)
        _finite("EditHparams", "nullspace_threshold", self.nullspace_threshold, positive=True)
        _finite("EditHparams", "l2", self.l2, positive=True)
        _finite("EditHparams", "norm_constraint", self.norm_constraint, minimum=0.0)
        if self.norm_constraint and self.covariance.identity:
            raise ValueError("norm_constraint needs C0: with covariance.identity (C0 = I) it only rescales lambda")
        if self.covariance.identity and self.spec.uses_null_space:
            raise ValueError(f"{self.spec.title} needs C0's null space: covariance.identity (C0 = I) has none")

    @property
    def preservation_shift(self) -> float:
        """What the norm constraint adds to C0's diagonal for ROME, MEMIT and EMMET."""
        return float(self.norm_constraint) / float(self.mom2_update_weight)

    @property
    def spec(self) -> Method:
        """The Method this names (site, template grouping, ridge, limits)."""
        return method_named(self.method)

    def replace(self, **changes) -> "EditHparams":
        return dataclasses.replace(self, **changes)

    def check_layers(self, num_layers: int):
        bad = [l for l in self.layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"unknown layer(s) {bad}: the model has layers 0..{num_layers - 1}")


def reference_templates(method: str | Method) -> TemplateHparams:
    """The context templates the method's reference implementation samples (see Method.template_groups)."""
    return TemplateHparams(groups=method_named(method).template_groups)


def _paper_llama3_8b(method: str) -> EditHparams:
    if method_named(method).uses_null_space:
        # AlphaEdit's authors (jianghoucheng/AlphaEdit, hparams/AlphaEdit/Llama3-8B.json): MEMIT's
        # layers 4-8, 25 steps, v_lr 0.1, clamp 0.75, weight decay 0.5, kl 0.0625; threshold 2e-2, L2 10.
        return EditHparams(method=method, layers=(4, 5, 6, 7, 8),
                           value=ValueHparams(v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75),
                           templates=reference_templates(method),
                           covariance=CovarianceHparams(n_samples=100000, max_length=512),
                           nullspace_threshold=2e-2, l2=10.0)
    # Yoon et al. 2024: edit layer 1, 25 steps, v_lr 0.5, clamp 4, kl 0.0625, weight decay 1e-3,
    # loss at the last layer.
    return EditHparams(method=method, layers=(1,), value=ValueHparams(),
                       templates=reference_templates(method),
                       covariance=CovarianceHparams(n_samples=100000, max_length=512))


_SMOLLM2_LAMBDA = {"memit": 100.0}


def _smollm2_135m(method: str) -> EditHparams:
    # MEMIT's lambda and layer, validated on 32 CounterFact "train" cases that no reported sweep uses
    # (experiments/results/preset_validation_memit.md, one batch of 32): at layer 3 lambda 10 and
    # 100 give the same decisions on every prompt (S 91.0 [84.3, 96.7], NS 81.2 against the unedited
    # 78.1), 1000 gives 88.7 and 15000 73.8 (PS falls as preservation grows); layers 1 and 5 reach
    # 90.6 and 87.3. So MEMIT uses layer 3 and lambda 100. EMMET's equality constraints reach ES 100
    # whatever lambda; lambda only scales its ridge, kept at the paper's 15000 * 0.1.
    # AlphaEdit: chosen on 32 CounterFact "train" cases (never reported; experiments/results/
    # preset_validation_alphaedit.md): SmolLM2's layer-3 C0 has its eigenvalues in 0.0017-0.48, so the
    # Llama-3 threshold 2e-2 leaves 1330 of 1536 directions; at l2 10 or 100 edits fail (ES 31-100),
    # at l2 1 thresholds 1e-2 and 2e-2 tie on S 91.0 [84.3, 96.7] with NS at the unedited level.
    null_space = {"nullspace_threshold": 1e-2, "l2": 1.0} if method_named(method).uses_null_space else {}
    return EditHparams(method=method, layers=(SMOLLM2_EDIT_LAYER,), value=ValueHparams(),
                       templates=reference_templates(method),
                       covariance=CovarianceHparams(n_samples=200, max_length=128),
                       mom2_update_weight=_SMOLLM2_LAMBDA.get(method_named(method).name, 15000.0), **null_space)


# Layer sweep on SmolLM2 (experiments/results/layer_sweep.md): ES and PS are 100 at layers 0-20 for
# MEMIT and 0-16 for ROME, and the efficacy margin EM is largest (~98) at layers 0-5 while the
# neighbourhood margin is least harmed there; as for Llama-3 in the paper, an early layer edits best.
SMOLLM2_EDIT_LAYER = 3


def _llama3_2_1b(method: str) -> EditHparams:
    # No published editing hparams exist for Llama-3.2-1B; it shares Llama-3-8B's tokenizer and value
    # settings, and the paper's layer 1 (AlphaEdit: 4-8) lies within its 16 layers, so it uses the
    # paper's Llama-3-8B preset.
    return _paper_llama3_8b(method)


def _easyedit_7b(model: str, method: str) -> EditHparams:
    # Qwen2.5-7B and Mistral-7B: EasyEdit's published hparams (zjunlp/EasyEdit hparams/<METHOD>/
    # <model>.yaml), whose values tests/jaxedit/interop/fixtures/easyedit/ holds; the tests read them
    # through jaxedit.interop.hparams_files and check them against these presets. EasyEdit has no EMMET
    # file for either model and no AlphaEdit file for Mistral-7B: EMMET takes the values of its EMMET
    # files for Llama models (llama-7b.yaml and llama3.2-3b.yaml agree), Mistral-7B's AlphaEdit those of
    # AlphaEdit/llama3-8b.yaml (the same widths and 32 layers). What the files do not carry (template
    # seed, early stop, C0 sample length 512) is the paper's Llama-3-8B preset's.
    m = method_named(method)
    value = ValueHparams(v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625)
    # EasyEdit's mom2_dataset "wikipedia" (jaxedit.interop.hparams_files.MOM2_DATASETS), 100k samples
    covariance = CovarianceHparams(corpus="wikipedia:20220301.en", n_samples=100000, max_length=512)
    common = {"templates": reference_templates(m), "covariance": covariance}
    if m.name == "rome":  # EasyEdit's ROME files say mom2_adjustment: false, i.e. C0 = I
        return EditHparams(method=m.name, layers=(5,), value=value, templates=reference_templates(m),
                           covariance=dataclasses.replace(covariance, identity=True))
    if m.name == "emmet":
        return EditHparams(method=m.name, layers=(5,), value=value, mom2_update_weight=100000.0, emmet_lambda=0.1,
                           **common)
    if m.uses_null_space:
        if model == "mistral-7b":  # AlphaEdit/llama3-8b.yaml's value settings
            value = ValueHparams(v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75,
                                 kl_factor=0.0625)
        return EditHparams(method=m.name, layers=(4, 5, 6, 7, 8), value=value, nullspace_threshold=2e-2, l2=1.0,
                           **common)
    return EditHparams(method=m.name, layers=(4, 5, 6, 7, 8), value=value, mom2_update_weight=15000.0, **common)


_PRESETS = {"llama3-8b": _paper_llama3_8b, "llama3.2-1b": _llama3_2_1b, "smollm2-135m": _smollm2_135m,
            "qwen2.5-7b": lambda method: _easyedit_7b("qwen2.5-7b", method),
            "mistral-7b": lambda method: _easyedit_7b("mistral-7b", method)}
PRESET_NAMES = tuple(sorted(_PRESETS))


def preset(model: str, method: str) -> EditHparams:
    """Hparams for (one of PRESET_NAMES, "rome" | "memit" | "emmet" | "alphaedit")."""
    if model not in _PRESETS:
        raise ValueError(f"no hparams preset for model {model!r}; known: {sorted(_PRESETS)}")
    return _PRESETS[model](method)


# The shapes that name a preset's model: (hidden_size, intermediate_size, num_hidden_layers,
# num_key_value_heads) and the vocabulary sizes its releases use. Widths alone do not tell models
# apart (Mistral-7B has Llama-3-8B's), the vocabulary does.
_PRESET_SHAPES = {
    "smollm2-135m": ((576, 1536, 30, 3), (49152,)),
    "llama3-8b": ((4096, 14336, 32, 8), (128256,)),       # Llama-3-8B and Llama-3.1-8B
    "llama3.2-1b": ((2048, 8192, 16, 8), (128256,)),
    "qwen2.5-7b": ((3584, 18944, 28, 4), (152064,)),      # Qwen2.5-7B and Qwen2-7B
    "mistral-7b": ((4096, 14336, 32, 8), (32000, 32768)),  # Mistral-7B v0.1/v0.2 and v0.3
}
BORROWED_PRESET = "llama3-8b"  # the paper's settings, for models that have no preset of their own


def preset_name_for(cfg) -> str | None:
    """The preset made for a model of cfg's shape, or None when no preset knows that shape."""
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads)
    for name, (shape, vocab_sizes) in _PRESET_SHAPES.items():
        if widths == shape and cfg.vocab_size in vocab_sizes:
            return name
    return None


def preset_for(cfg, method: str) -> EditHparams:
    """The preset hparams of `method` for the model described by cfg (a llama3_flax LlamaConfig).

    The model is recognised from its shape (hidden_size, intermediate_size, num_hidden_layers,
    num_key_value_heads, vocab_size). Any other model borrows BORROWED_PRESET's settings, and a
    warning is logged naming the borrowed preset and its layers: they were not chosen for that model.
    """
    name = preset_name_for(cfg)
    if name is not None:
        return preset(name, method)
    hp = preset(BORROWED_PRESET, method)
    logger.warning(
        "no hparams preset knows a model of this shape (hidden_size=%d, intermediate_size=%d, num_hidden_layers=%d, "
        "num_key_value_heads=%d, vocab_size=%d); %s borrows the %r preset (layers %s), not chosen for this model "
        "(known: %s)", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads,
        cfg.vocab_size, hp.spec.title, BORROWED_PRESET, list(hp.layers), ", ".join(PRESET_NAMES))
    return hp
