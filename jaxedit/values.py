"""Target values: for every request of a batch at once, the vector that, added at the subject's last
token to the edited layer's output, makes the model say target_new (one jitted Adam loop)."""
from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama3_flax.model import (Capture, embed, empty_kv_cache, final_hidden, rope_positions, run_layers,
                               run_layers_cached, unembedding)
from llama3_flax import math as lm

from .hparams import ValueHparams
from .keys import fill, pad_rows, subject_last_index
from .requests import EditRequest
from .tokenize import encode_prompt, encode_target, pad_id

KL_TEMPLATE = "{} is a"


@flax.struct.dataclass
class ValueBatch:
    """Rows: for each request, its rewriting prompts (one per template), then one KL row per request.

    tokens, mask: (N, T). lookup: (N,) subject-last-token slot. owner: (N,) request index.
    target_pos, target_ids, target_w: (N, Tt) slots whose next-token prediction is scored, the token
      expected there, and 1/len(target) on real target tokens of rewriting rows (0 elsewhere).
    rewrite_w: (n, N) averages a row quantity over each request's rewriting rows.
    kl_rows: (n,) the KL row of each request.
    """

    tokens: jax.Array
    mask: jax.Array
    lookup: jax.Array
    owner: jax.Array
    target_pos: jax.Array
    target_ids: jax.Array
    target_w: jax.Array
    rewrite_w: jax.Array
    kl_rows: jax.Array


def build_value_batch(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]) -> ValueBatch:
    """Rewriting prompt = template around the prompt, then target_new's tokens but the last (teacher
    forcing: position j predicts target token j)."""
    ids, lookup, owner, tpos, tids = [], [], [], [], []
    n = len(requests)
    for i, r in enumerate(requests):
        target = encode_target(tokenizer, r.target_new)
        for t in templates:
            prefix, text = fill(t, r)
            prompt = encode_prompt(tokenizer, text)
            ids.append(prompt + target[:-1])
            lookup.append(subject_last_index(tokenizer, prefix, r))
            owner.append(i)
            tpos.append([len(prompt) - 1 + j for j in range(len(target))])
            tids.append(target)
    kl_start = len(ids)
    for i, r in enumerate(requests):
        prefix = KL_TEMPLATE[: KL_TEMPLATE.index("{}")]  # "{subject} is a": the subject alone, no prompt
        text = KL_TEMPLATE.replace("{}", r.subject)
        ids.append(encode_prompt(tokenizer, text))
        lookup.append(subject_last_index(tokenizer, prefix, r))
        owner.append(i)
        tpos.append([])
        tids.append([])
    tokens, mask, lookup_arr = pad_rows(ids, np.asarray(lookup, np.int32), pad_id(tokenizer))
    rows = tokens.shape[0]
    owner = np.asarray(owner + [0] * (rows - len(owner)), np.int32)
    tt = max(len(p) for p in tpos)
    target_pos = np.zeros((rows, tt), np.int32)
    target_ids = np.zeros((rows, tt), np.int32)
    target_w = np.zeros((rows, tt), np.float32)
    for row, (p, t) in enumerate(zip(tpos, tids)):
        target_pos[row, :len(p)] = p
        target_ids[row, :len(t)] = t
        target_w[row, :len(t)] = 1.0 / max(len(t), 1)
    rewrite_w = np.zeros((n, rows), np.float32)
    for row in range(kl_start):
        rewrite_w[owner[row], row] = 1.0 / len(templates)
    return ValueBatch(*(jnp.asarray(a) for a in (tokens, mask, lookup_arr, owner, target_pos, target_ids,
                                                 target_w, rewrite_w, np.arange(kl_start, kl_start + n))))


@flax.struct.dataclass
class Values:
    """Per request (n, ·): target = init + delta, where init is the edited layer's output at the
    subject's last token of the bare prompt (ROME: MLP output; MEMIT/EMMET: residual output)."""

    target: jax.Array
    init: jax.Array
    delta: jax.Array
    loss: jax.Array
    nll: jax.Array
    steps: jax.Array


def _gather_rows(h, pos):
    return jnp.take_along_axis(h, pos[:, :, None], axis=1)


def _safe_norm(x):
    """||x|| over the last axis with gradient 0 (not NaN) at x = 0, like torch.norm."""
    sq = jnp.sum(x * x, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def suffix_width(batch: ValueBatch, multiple: int = 4) -> int:
    """Slots from the subject's last token to the end of the longest row, bucketed."""
    lengths = np.asarray(batch.mask).sum(axis=1)
    need = int(np.max(lengths - np.asarray(batch.lookup)))
    return max(multiple, -(-need // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("cfg", "hp", "site", "width"))
def optimise_values(params, cfg, batch: ValueBatch, layer, hp: ValueHparams, site: str, width: int) -> Values:
    """The batched value optimisation (losses as in the ROME/MEMIT reference implementations):

    loss_r = mean over r's rewriting prompts of the mean-token NLL of target_new
             + kl_factor * KL(p_delta || p_0) of the next-token distribution at the subject's last
               token of "{subject} is a" (where the reference implementations read it)
             + v_weight_decay * ||delta_r|| / ||init_r||^2,
    Adam(v_lr) for at most v_num_grad_steps evaluations, delta_r clamped to clamp_norm_factor *
    ||init_r||, request r frozen once loss_r < early_stop_loss. The requests' losses are independent
    and Adam is elementwise, so optimising them jointly equals optimising each alone.

    Prefix caching: nothing before the subject's last token depends on delta (causal attention), and
    no layer up to `layer` does. So one pass fills a key/value cache, and each step runs only the
    `width` slots from the subject's last token on, through the layers after `layer`.
    """
    n = batch.rewrite_w.shape[0]
    rows, t = batch.tokens.shape
    capture = Capture(layers=jnp.reshape(layer, (1,)), positions=batch.lookup[:, None])
    h_layer, captured = run_layers(params, cfg, embed(params, batch.tokens), batch.mask, last_layer=layer,
                                   capture=capture)
    outputs = captured.mlp_out if site == "mlp" else captured.resid_out
    first_row = jnp.argmax(batch.rewrite_w > 0, axis=1)  # the "{}" template row of each request
    init = outputs[0, first_row, 0].astype(jnp.float32)  # (n, D)
    init_norm = jnp.linalg.norm(init, axis=-1)

    # Fill the cache of the later layers at delta = 0 (its slots before the subject stay valid).
    positions = rope_positions(batch.mask)
    key_mask = jnp.pad(batch.mask, ((0, 0), (0, width)))
    all_slots = jnp.broadcast_to(jnp.arange(t), (rows, t))
    _, caches = run_layers_cached(params, cfg, h_layer, positions, all_slots, key_mask,
                                  empty_kv_cache(cfg, rows, t + width), first_layer=layer + 1)
    slots = batch.lookup[:, None] + jnp.arange(width)  # (N, W) the recomputed slots
    h_suffix = _gather_rows(h_layer, jnp.minimum(slots, t - 1))
    pos_suffix = jnp.take_along_axis(positions, jnp.minimum(slots, t - 1), axis=1)
    target_pos = jnp.clip(batch.target_pos - batch.lookup[:, None], 0, width - 1)
    w_out = unembedding(params, cfg)

    def log_probs_at(h, pos):
        return jax.nn.log_softmax(lm.linear(final_hidden(params, cfg, _gather_rows(h, pos)), w_out)
                                  .astype(jnp.float32), axis=-1)

    def losses(delta, ref_kl):
        h = h_suffix.at[:, 0].add(delta[batch.owner].astype(h_suffix.dtype))
        h, _ = run_layers_cached(params, cfg, h, pos_suffix, slots, key_mask, caches, first_layer=layer + 1)
        lp = log_probs_at(h, target_pos)  # (N, Tt, V)
        tok_lp = jnp.take_along_axis(lp, batch.target_ids[:, :, None], axis=-1)[..., 0]
        nll_rows = -jnp.sum(tok_lp * batch.target_w, axis=1)  # mean-token NLL per row
        nll = batch.rewrite_w @ nll_rows
        kl_lp = log_probs_at(h[batch.kl_rows], jnp.zeros((n, 1), jnp.int32))[:, 0]
        kl = jnp.sum(jnp.exp(kl_lp) * (kl_lp - ref_kl), axis=-1)
        per_request = nll + hp.kl_factor * kl + hp.v_weight_decay * _safe_norm(delta) / init_norm ** 2
        return jnp.sum(per_request), (per_request, nll, kl_lp)

    zeros = jnp.zeros_like(init)
    _, (_, _, ref_kl) = losses(zeros, jnp.zeros((n, w_out.shape[0]), jnp.float32))
    ref_kl = jax.lax.stop_gradient(ref_kl)
    opt = optax.adam(hp.v_lr)
    max_norm = hp.clamp_norm_factor * init_norm

    def cond(state):
        it, _, _, done, *_ = state
        return (it < hp.v_num_grad_steps) & ~jnp.all(done)

    def body(state):
        it, delta, opt_state, done, loss, nll, steps = state
        (_, (per_request, per_nll, _)), grad = jax.value_and_grad(losses, has_aux=True)(delta, ref_kl)
        loss = jnp.where(done, loss, per_request)
        nll = jnp.where(done, nll, per_nll)
        done = done | (per_request < hp.early_stop_loss) | (it == hp.v_num_grad_steps - 1)
        updates, new_state = opt.update(grad, opt_state, delta)
        stepped = delta + updates
        norm = jnp.linalg.norm(stepped, axis=-1)
        stepped = stepped * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))[:, None]
        delta = jnp.where(done[:, None], delta, stepped)
        steps = steps + (~done).astype(jnp.int32)
        return it + 1, delta, new_state, done, loss, nll, steps

    state = (jnp.int32(0), zeros, opt.init(zeros), jnp.zeros(n, bool), jnp.zeros(n), jnp.zeros(n),
             jnp.zeros(n, jnp.int32))
    _, delta, _, _, loss, nll, steps = jax.lax.while_loop(cond, body, state)
    return Values(target=init + delta, init=init, delta=delta, loss=loss, nll=nll, steps=steps)


def compute_values(params, cfg, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                   layer: int, hp: ValueHparams, site: str = "resid", chunk_size: int = 64) -> Values:
    """Values for all requests, optimised together in chunks of `chunk_size` requests.

    site: "resid" (MEMIT/EMMET: the layer's residual output) or "mlp" (ROME: its MLP output); the
    delta is injected at the same place either way (the MLP output is the last term of the residual).
    """
    if site not in ("resid", "mlp"):
        raise ValueError(f"site must be 'resid' or 'mlp', got {site!r}")
    if hp.v_loss_layer not in (-1, cfg.num_hidden_layers - 1):
        raise ValueError(f"v_loss_layer={hp.v_loss_layer}: only the last layer is supported")
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"unknown layer {layer}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    parts = []
    for start in range(0, len(requests), chunk_size):
        batch = build_value_batch(tokenizer, requests[start:start + chunk_size], templates)
        parts.append(optimise_values(params, cfg, batch, jnp.int32(layer), hp, site, suffix_width(batch)))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
