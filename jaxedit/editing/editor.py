"""One editing core for ROME, MEMIT and EMMET: values at the last edited layer, then per layer keys,
residuals and the shared preservation-memorisation solve. Pure: params in, new params out."""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.editing import pm
from jaxedit.hparams import EditHparams
from jaxedit.editing.keys import keys_at_layers, outputs_at_subject
from jaxedit.requests import EditRequest, validate_batch
from jaxedit.editing.templates import flat
from jaxedit.editing.values import Values, compute_values

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

    def summary(self) -> str:
        v = self.values
        return (f"{self.method} layers={self.layers} n={len(self.case_ids)} "
                f"loss={float(jnp.mean(v.loss)):.3f} nll={float(jnp.mean(v.nll)):.3f} "
                f"steps={float(jnp.mean(v.steps)):.1f} |dW|={', '.join(f'{x:.3g}' for x in self.delta_norms)} "
                + " ".join(f"{k}={s:.2f}s" for k, s in self.seconds.items()))


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


def layer_update(hparams: EditHparams, C, K: jax.Array, R: jax.Array) -> tuple[jax.Array, pm.PMReport]:
    """The method's update of one layer: dW (D, F) for keys K (F, n) and residuals R (D, n) on the
    preservation matrix C (F, F) or its pm.factor_preservation, with the method's ridge."""
    if not isinstance(C, pm.Preservation):
        C = pm.factor_preservation(jnp.asarray(C))
    ridge = hparams.spec.ridge(hparams.mom2_update_weight, hparams.emmet_lambda, int(K.shape[1]))
    return pm.pm_delta(C, K, R, ridge)


def edit_values(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *, templates,
                chunk_size: int = 64) -> Values:
    """The target values an edit with these hparams would use (at the last edited layer; ROME: MLP
    output site, MEMIT/EMMET: residual site)."""
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    return compute_values(params, cfg, tokenizer, requests, flat(templates), hparams.layers[-1], hparams.value,
                          hparams.spec.site, chunk_size=chunk_size)


def edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
         covariances: Covariances, templates, values: Values | None = None, value_chunk_size: int = 64):
    """Applies hparams.method to a batch of requests. Returns (new params, EditReport).

    Args:
      params: the model's parameter tree (never modified).
      requests: EditRequests (ROME: exactly one; see hparams.spec, the jaxedit.methods.Method).
      covariances: {layer: C0 (F, F) or pm.factor_preservation(C0)} for every edited layer.
      templates: context template groups from jaxedit.editing.templates.context_templates (ROME averages keys
        over all its templates; MEMIT/EMMET within each group, then across groups).
    """
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    method = hparams.spec
    method.check_requests(len(requests))
    missing = [l for l in hparams.layers if l not in covariances]
    if missing:
        raise ValueError(f"no preservation covariance for layer(s) {missing}; have {sorted(covariances)}")
    groups = tuple(templates) if method.grouped_templates else (flat(templates),)
    z_layer = hparams.layers[-1]
    seconds = {"keys": 0.0, "values": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    if values is None:
        values = edit_values(params, cfg, tokenizer, requests, hparams, templates=templates,
                             chunk_size=value_chunk_size)
    elif values.target.shape[0] != len(requests):
        raise ValueError(f"values are given for {values.target.shape[0]} requests, but there are {len(requests)}")
    values = jax.block_until_ready(values)
    seconds["values"] = time.perf_counter() - t0

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
        dW, report = layer_update(hparams, covariances[layer], K, R)
        if not bool(report.ok):
            raise FloatingPointError(f"{method.title} solve failed at layer {layer} (preservation matrix not "
                                     f"factorable, cond ~ {float(report.preservation_cond):.3g})")
        new = add_to_down_proj(new, layer, dW)
        jax.block_until_ready(new["layers"]["down_proj"])
        seconds["solve"] += time.perf_counter() - t0
        solves.append(report)
        written.append(K)
        norms.append(float(jnp.linalg.norm(dW)))
    report = EditReport(method=method.name, layers=hparams.layers, case_ids=tuple(r.case_id for r in requests),
                        values=values, solves=tuple(solves), keys=tuple(written), delta_norms=tuple(norms), seconds=seconds)
    return new, report


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
