"""One editing core for ROME, MEMIT and EMMET: values at the last edited layer, then per layer keys,
residuals and the shared preservation-memorisation solve. Pure: params in, new params out."""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import pm
from .hparams import EditHparams
from .keys import keys_at_layers, outputs_at_subject
from .requests import EditRequest, validate_batch
from .templates import flat
from .values import Values, compute_values

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


def _solve(method: str, hp: EditHparams, C, K, R, cols: int):
    if method == "rome":
        if cols != 1:
            raise ValueError(f"ROME edits one fact at a time, got {cols} requests: use MEMIT or EMMET for "
                             "batches, or a sequential schedule")
        return pm.pm_delta(C, K, R, 0.0)
    if method == "memit":
        return pm.memit_delta(C, K, R, hp.mom2_update_weight, return_report=True)
    return pm.emmet_delta(C, K, R, hp.mom2_update_weight, hp.emmet_lambda, return_report=True)


def edit_values(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *, templates,
                chunk_size: int = 64) -> Values:
    """The target values an edit with these hparams would use (at the last edited layer; ROME: MLP
    output site, MEMIT/EMMET: residual site)."""
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    site = "mlp" if hparams.method == "rome" else "resid"
    return compute_values(params, cfg, tokenizer, requests, flat(templates), hparams.layers[-1], hparams.value,
                          site, chunk_size=chunk_size)


def edit(params, cfg, tokenizer, requests: Sequence[EditRequest], hparams: EditHparams, *,
         covariances: Covariances, templates, values: Values | None = None, value_chunk_size: int = 64):
    """Applies hparams.method to a batch of requests. Returns (new params, EditReport).

    Args:
      params: the model's parameter tree (never modified).
      requests: EditRequests (ROME: exactly one).
      covariances: {layer: C0 (F, F) or pm.factor_preservation(C0)} for every edited layer.
      templates: context template groups from jaxedit.templates.context_templates (ROME averages keys
        over all its templates; MEMIT/EMMET within each group, then across groups).
    """
    requests = validate_batch(requests)
    hparams.check_layers(cfg.num_hidden_layers)
    missing = [l for l in hparams.layers if l not in covariances]
    if missing:
        raise ValueError(f"no preservation covariance for layer(s) {missing}; have {sorted(covariances)}")
    method = hparams.method
    groups = (flat(templates),) if method == "rome" else tuple(templates)
    site = "mlp" if method == "rome" else "resid"
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
        current = mlp_out if site == "mlp" else resid_out
        R = pm.spread_residual((values.target - current).T, i, len(hparams.layers))  # (D, n)
        K, R = jax.block_until_ready((K, R))
        seconds["keys"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        C = covariances[layer]
        if not isinstance(C, pm.Preservation):
            C = pm.factor_preservation(jnp.asarray(C))
        dW, report = _solve(method, hparams, C, K, R, len(requests))
        if not bool(report.ok):
            raise FloatingPointError(f"{method} solve failed at layer {layer} (preservation matrix not "
                                     f"factorable, cond ~ {float(report.preservation_cond):.3g})")
        new = add_to_down_proj(new, layer, dW)
        jax.block_until_ready(new["layers"]["down_proj"])
        seconds["solve"] += time.perf_counter() - t0
        solves.append(report)
        written.append(K)
        norms.append(float(jnp.linalg.norm(dW)))
    report = EditReport(method=method, layers=hparams.layers, case_ids=tuple(r.case_id for r in requests),
                        values=values, solves=tuple(solves), keys=tuple(written), delta_norms=tuple(norms), seconds=seconds)
    return new, report
