"""One editing core for ROME, MEMIT and EMMET: values at the last edited layer, then per layer keys,
residuals and the shared preservation-memorisation solve. Pure: params in, new params out."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.cache import model_fingerprint
from jaxedit.distributed import to_host
from jaxedit.editing import pm, preflight
from jaxedit.hparams import EditHparams
from jaxedit.editing.keys import keys_at_layers, outputs_at_subject
from jaxedit.requests import EditRequest, validate_batch
from jaxedit.editing.templates import flat
from jaxedit.editing.tokenize import check_tokenizer
from jaxedit.editing.values import Values, ValuesFor, compute_values, request_digest

logger = logging.getLogger(__name__)

Covariances = Mapping[int, Union[jax.Array, np.ndarray, pm.Preservation]]


@dataclasses.dataclass(frozen=True)
class EditReport:
    """What an edit did: per-request value optimisation results, per-layer solve diagnostics, and
    seconds per stage (keys, values, solve)."""

    method: str
    layers: tuple[int, ...]
    case_ids: tuple
    values: Values
    solves: tuple[pm.PMReport, ...]
    keys: tuple[jax.Array, ...]  # (F, n) keys written at each edited layer
    delta_norms: tuple[float, ...]
    seconds: dict
    repairs: tuple[str, ...] = ()   # what was regularised to make the edit possible (also logged)
    warnings: tuple[str, ...] = ()  # e.g. an update out of proportion to its layer (also logged)

    def summary(self) -> str:
        v = self.values
        return (f"{self.method} layers={self.layers} n={len(self.case_ids)} "
                f"loss={float(jnp.mean(v.loss)):.3f} nll={float(jnp.mean(v.nll)):.3f} "
                f"steps={float(jnp.mean(v.steps)):.1f} |dW|={', '.join(f'{x:.3g}' for x in self.delta_norms)} "
                + " ".join(f"{k}={s:.2f}s" for k, s in self.seconds.items())
                + "".join(f"\n  repaired: {r}" for r in self.repairs)
                + "".join(f"\n  WARNING: {w}" for w in self.warnings))


def add_to_down_proj(params, layer: int, delta: jax.Array):
    """A new params tree with delta (D, F) added to layer's down_proj; the input tree is untouched."""
    layers = dict(params["layers"])
    w = layers["down_proj"]
    layers["down_proj"] = w.at[layer].add(delta.astype(w.dtype))
    return {**params, "layers": layers}


def down_proj(params, layer: int) -> jax.Array:
    return params["layers"]["down_proj"][layer]


def with_previous_keys(C0: Union[jax.Array, np.ndarray], previous_keys: jax.Array, lam: float) -> jax.Array:
    """C0 + K_prev K_prev^T / lam: preserving earlier edits' keys alongside C0 (sequential editing).

    MEMIT's objective lam ||dW K0||^2 with K0 K0^T = C0 becomes lam ||dW K0||^2 + ||dW K_prev||^2.
    """
    k = jnp.asarray(previous_keys, jnp.float32)
    return jnp.asarray(C0, jnp.float32) + (k @ k.T) / lam


def layer_update(hparams: EditHparams, C, K: jax.Array, R: jax.Array, previous_keys: jax.Array | None = None
                 ) -> tuple[jax.Array, pm.PMReport]:
    """The method's update of one layer: dW (D, F) for keys K (F, n) and residuals R (D, n).

    C: the preservation matrix C0 (F, F), or what the method solves with: pm.factor_preservation(C0)
    (ROME, MEMIT, EMMET: the method's ridge) or pm.null_space(C0, threshold) (AlphaEdit, which also
    keeps previous_keys (F, m), the keys earlier edits wrote, in place)."""
    if hparams.spec.uses_null_space:
        if not isinstance(C, pm.NullSpace):
            C = pm.null_space(jnp.asarray(C), hparams.nullspace_threshold)
        return pm.alphaedit_delta(C, K, R, hparams.l2 + hparams.norm_constraint, previous_keys=previous_keys)
    if not isinstance(C, pm.Preservation):
        C = pm.factor_preservation(jnp.asarray(C), shift=hparams.preservation_shift)
    ridge = hparams.spec.ridge(hparams.mom2_update_weight, hparams.emmet_lambda, int(K.shape[1]))
    return pm.pm_delta(C, K, R, ridge)


def edit_values(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *, templates,
                chunk_size: int = 64) -> Values:
    """The target values an edit with these hparams would use (at the last edited layer; ROME: MLP
    output site, MEMIT/EMMET: residual site). They carry what they were made for (Values.made_for)."""
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    check_tokenizer(tokenizer, cfg)
    templates = preflight.check_template_groups(templates)
    return compute_values(params, cfg, tokenizer, requests, flat(templates), hparams.layers[-1], hparams.value,
                          hparams.spec.site, chunk_size=chunk_size)


def _values_for(params, cfg, requests, hparams: EditHparams) -> ValuesFor:
    return ValuesFor(model=model_fingerprint(params, cfg), layer=hparams.layers[-1], site=hparams.spec.site,
                     requests=tuple(request_digest(r) for r in requests))


def edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
         covariances: Covariances, templates, values: Values | None = None, value_chunk_size: int = 64,
         allow_jitter: bool = False, previous_keys: Mapping[int, jax.Array] | None = None):
    """Applies hparams.method to a batch of requests. Returns (new params, EditReport).

    Args:
      params: the model's parameter tree (never modified).
      requests: EditRequests (ROME: exactly one; see hparams.spec, the jaxedit.methods.Method).
      covariances: {layer: C0 (F, F)} for every edited layer, or what the method solves with:
        pm.factor_preservation(C0) (ROME, MEMIT, EMMET) or a pm.NullSpace (AlphaEdit).
      templates: context template groups from jaxedit.editing.templates.context_templates (ROME averages keys
        over all its templates; MEMIT/EMMET within each group, then across groups).
      values: target values from edit_values for exactly these requests, layer, site and model
        (refused otherwise); None computes them.
      allow_jitter: accept a semi-definite C0 with a diagonal jitter (reported in EditReport.repairs).
      previous_keys: AlphaEdit: {layer: (F, m) keys written by earlier edits}, kept in place (the
        sequential schedules pass them); refused for the other methods.
    Raises:
      ValueError before any expensive work: bad requests, layers, templates, C0 or values.
    """
    # Cheap checks first: everything that can be wrong is found before the value optimisation.
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    method = hparams.spec
    method.check_requests(len(requests))
    check_tokenizer(tokenizer, cfg)
    templates = preflight.check_template_groups(templates)
    warnings: list[str] = []
    if method.uses_null_space:
        factors, warnings = preflight.null_spaces(covariances, hparams.layers, cfg.intermediate_size,
                                                  hparams.nullspace_threshold)
        repairs = []
    else:
        factors, repairs = preflight.preservation_factors(covariances, hparams.layers, cfg.intermediate_size,
                                                          allow_jitter=allow_jitter,
                                                          shift=hparams.preservation_shift)
    previous_keys = _checked_previous_keys(previous_keys, method, hparams.layers, cfg.intermediate_size)
    if values is not None:
        _check_values(values, _values_for(params, cfg, requests, hparams), cfg)
    groups = tuple(templates) if method.grouped_templates else (flat(templates),)
    z_layer = hparams.layers[-1]
    seconds = {"keys": 0.0, "values": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    if values is None:
        values = edit_values(params, cfg, tokenizer, requests, hparams, templates=templates,
                             chunk_size=value_chunk_size)
    values = jax.block_until_ready(values)
    seconds["values"] = time.perf_counter() - t0
    if not bool(jnp.all(jnp.isfinite(values.target))):
        bad = [requests[i].case_id for i in np.flatnonzero(~np.all(np.isfinite(to_host(values.target)), axis=1))]
        raise ValueError(f"target values of case(s) {bad[:8]} contain NaN or inf; nothing was edited")

    new, solves, norms, written = params, [], [], []
    for i, layer in enumerate(hparams.layers):
        t0 = time.perf_counter()
        K = keys_at_layers(new, cfg, tokenizer, requests, groups, [layer])[0].T  # (F, n)
        mlp_out, resid_out = outputs_at_subject(new, cfg, tokenizer, requests, z_layer)
        current = mlp_out if method.site == "mlp" else resid_out
        R = pm.spread_residual((values.target - current).T, i, len(hparams.layers))  # (D, n)
        K, R = jax.block_until_ready((K, R))
        seconds["keys"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        dW, report = layer_update(hparams, factors[layer], K, R, previous_keys.get(layer))
        if not bool(report.ok):
            raise FloatingPointError(f"{method.title} solve failed at layer {layer} (preservation matrix not "
                                     f"factorable, cond ~ {float(report.preservation_cond):.3g})")
        new = add_to_down_proj(new, layer, dW)
        jax.block_until_ready(new["layers"]["down_proj"])
        seconds["solve"] += time.perf_counter() - t0
        solves.append(report)
        written.append(K)
        norms.append(float(jnp.linalg.norm(dW)))
        if bool(report.regularised):
            repairs.append(f"layer {layer}: the {len(requests)}x{len(requests)} system was ill-conditioned "
                           f"(cond {float(report.cond):.3g}); added ridge {float(report.ridge_added):.3g} "
                           "(duplicated or dependent keys?)")
            logger.warning("%s", repairs[-1])
        warning = preflight.check_update_norm(layer, norms[-1], float(jnp.linalg.norm(down_proj(params, layer))),
                                              len(requests))
        if warning:
            warnings.append(warning)
    report = EditReport(method=method.name, layers=hparams.layers, case_ids=tuple(r.case_id for r in requests),
                        values=values, solves=tuple(solves), keys=tuple(written), delta_norms=tuple(norms),
                        seconds=seconds, repairs=tuple(repairs), warnings=tuple(warnings))
    return new, report


def _checked_previous_keys(previous_keys, method, layers, size: int) -> dict:
    if not previous_keys:
        return {}
    if not method.keeps_previous_keys:
        raise ValueError(f"{method.title} does not take previous_keys (AlphaEdit does); MEMIT and EMMET keep "
                         "earlier edits through the preservation matrix (schedule preserve_previous_edits)")
    out = {}
    for layer, k in previous_keys.items():
        if layer not in layers:
            raise ValueError(f"previous_keys for layer {layer}, which this edit does not change (layers {layers})")
        if np.ndim(k) != 2 or np.shape(k)[0] != size:
            raise ValueError(f"previous_keys of layer {layer} must be (F, m) with F = {size}, got shape "
                             f"{tuple(np.shape(k))}")
        out[layer] = jnp.asarray(k, jnp.float32)
    return out


def _check_values(values: Values, expected: ValuesFor, cfg) -> None:
    """Refuses values made for another edit (other layer, site, requests or model) or of the wrong shape."""
    n, width = len(expected.requests), cfg.hidden_size
    if values.target.ndim != 2 or values.target.shape[0] != n:
        raise ValueError(f"values are given for {values.target.shape[0] if values.target.ndim else 0} requests, "
                         f"but there are {n}")
    if values.target.shape[1] != width:
        raise ValueError(f"values have width {values.target.shape[1]}; the model's width is {width} "
                         "(values of another model?)")
    if values.made_for is None:
        raise ValueError("values carry no identity (Values.made_for is None): compute them with "
                         "jaxedit.edit_values, or select from such values with Values.select")
    wrong = values.made_for.mismatch(expected)
    if wrong:
        raise ValueError("values were computed for another edit: " + "; ".join(wrong))


def _named_editor(name: str):
    def editor(params, cfg, tokenizer, requests, hparams: EditHparams, *, covariances, templates, **kwargs):
        if hparams.method != name:
            raise ValueError(f"{name}() was given hparams for {hparams.method!r}: use "
                             f"hparams.replace(method={name!r}) or jaxedit.edit")
        return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates,
                    **kwargs)

    editor.__name__ = editor.__qualname__ = name
    editor.__doc__ = (f"Edits with {name.upper()} (hparams.method must be {name!r}): the editing core `edit` "
                      "under its method's name. Returns (new params, EditReport).")
    return editor


rome = _named_editor("rome")
memit = _named_editor("memit")
emmet = _named_editor("emmet")
alphaedit = _named_editor("alphaedit")
