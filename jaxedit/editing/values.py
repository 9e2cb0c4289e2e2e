"""Target values: for every request of a batch at once, the vector that, added at the subject's last
token to the edited layer's output, makes the model say target_new (one jitted Adam loop)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama3_flax.sharding import mesh_of, rows_over_data
from llama3_flax.model import (Capture, embed, empty_kv_cache, final_hidden, layer_window, rope_positions,
                               run_layers, run_layers_cached, run_layers_over_prefix, unembedding,
                               window_layers)
from llama3_flax import math as lm

from jaxedit.cache import model_fingerprint
from jaxedit.hparams import ValueHparams
from jaxedit.editing.keys import fill, pad_rows, subject_last_index
from jaxedit.requests import EditRequest
from jaxedit.editing.tokenize import check_lengths, check_token_ids, encode_prompt, encode_target, pad_id
from jaxedit.packing import bucket, bucket_geometric, first_fit_decreasing

KL_TEMPLATE = "{} is a"


@flax.struct.dataclass
class SuffixLanes:
    """The token slots that depend on the delta (each row's, from the subject's last token to its end),
    packed densely into lanes of W tokens, so short suffixes cost no padding.

    Several rows share a lane; each keeps its own stretch of the lane's read-only prefix cache (a copy
    of its row's keys/values before the subject's last token). A row's lane tokens occupy slots
    [start, end) of the lane; each of them sees the earlier ones of the row, and the row's cached
    prefix (llama3_flax.math.attention_bias with key ends).

    row, slot: (Lanes, W) the row and slot of each lane token (0 for padding tokens).
    end: (Lanes, W) the end of the token's row in the lane (0 for padding: seen by nothing).
    inject: (Lanes, W) 1 at each real row's subject last token (where the delta is added).
    cache_row, cache_slot: (Lanes, S) the row cache slot each prefix cache slot is copied from.
    cache_start, cache_end: (Lanes, S) the lane slots [start, end) of the row owning each prefix
      cache slot (0, 0 for unused slots).
    """

    row: jax.Array
    slot: jax.Array
    end: jax.Array
    inject: jax.Array
    cache_row: jax.Array
    cache_slot: jax.Array
    cache_start: jax.Array
    cache_end: jax.Array

    @property
    def tokens(self) -> int:
        return int(self.row.shape[0] * self.row.shape[1])


@flax.struct.dataclass
class ValueBatch:
    """Rows: for each request, its rewriting prompts (one per template), then one KL row per request.

    tokens, mask: (N, T). lookup: (N,) subject-last-token slot. owner: (N,) request index.
    first_row: (n,) each request's "{}" template row (where the initial value is read).
    lanes: the rows' suffixes, packed (SuffixLanes); flat lane-token indices below are lane * W + i.
    target_tok, target_ids: (M,) the lane token whose output predicts each target token, and the token.
    target_req, target_w: (M,) its request, and 1 / (len(target) * templates) (0 for padding slots):
      summing target_w * NLL per request gives the mean over templates of the mean-token NLL.
    kl_tok: (n,) the lane token of each request's KL position.
    prefix_width: (static) the slots 0..prefix_width-1 hold every row's prefix (the slots before its
      subject's last token): the later layers' caches are filled over these only.
    """

    tokens: jax.Array
    mask: jax.Array
    lookup: jax.Array
    owner: jax.Array
    first_row: jax.Array
    lanes: SuffixLanes
    target_tok: jax.Array
    target_ids: jax.Array
    target_req: jax.Array
    target_w: jax.Array
    kl_tok: jax.Array
    prefix_width: int = flax.struct.field(pytree_node=False, default=0)


LANE_WIDTHS = (8, 12, 16, 24, 32)


def pack_suffixes(lengths: Sequence[int], lookup: Sequence[int], widths: Sequence[int] = LANE_WIDTHS
                  ) -> tuple[SuffixLanes, np.ndarray]:
    """First-fit-decreasing packing of the rows' suffixes (slots lookup..length-1) into lanes.

    The lane width is the one of `widths` (or the longest suffix rounded up to 8, if longer) whose
    packing runs the fewest token slots once the lane count is rounded up to a shape bucket; ties go
    to the narrower lanes, whose prefix caches are shorter (attention cost). Trying several widths
    keeps the padding of the bucketed lane count small at every batch size (one width alone leaves up
    to a third of the slots empty just above a bucket boundary).
    Lane counts and cache lengths are rounded up so that similar batches share compilations.
    Returns the lanes and the flat lane-token index of each row's first suffix token.
    """
    suffix = [length - start for length, start in zip(lengths, lookup)]
    longest = max(suffix)
    candidates = sorted({w for w in widths if w >= longest} or {bucket(longest, 8)})
    best = None
    for w in candidates:
        packed = first_fit_decreasing(suffix, w)  # rows of each lane
        # Geometric buckets: a run of single edits compiles a few programs, not one per request.
        n_lanes = bucket_geometric(len(packed), 1)
        cache = bucket_geometric(max(sum(lookup[r] for r in lane) for lane in packed), 32)
        key = (n_lanes * w, cache + w)
        if best is None or key < best[0]:
            best = key, w, packed, n_lanes, cache
    _, width, lanes, n_lanes, cache_len = best
    shape, cshape = (n_lanes, width), (n_lanes, cache_len)
    row, slot, end, inject = (np.zeros(shape, np.int32) for _ in range(4))
    cache_row, cache_slot, cache_start, cache_end = (np.zeros(cshape, np.int32) for _ in range(4))
    first_tok = np.zeros(len(suffix), np.int32)
    for lane, members in enumerate(lanes):
        offset, i = 0, 0  # cache offset of the member, next lane token
        for r in members:
            stretch = slice(offset, offset + lookup[r])
            cache_row[lane, stretch], cache_slot[lane, stretch] = r, np.arange(lookup[r])
            cache_start[lane, stretch], cache_end[lane, stretch] = i, i + suffix[r]
            k = np.arange(suffix[r])
            row[lane, i + k], slot[lane, i + k], end[lane, i + k] = r, lookup[r] + k, i + suffix[r]
            inject[lane, i] = 1
            first_tok[r] = lane * width + i
            offset, i = offset + lookup[r], i + suffix[r]
    arrays = (row, slot, end, inject, cache_row, cache_slot, cache_start, cache_end)
    return SuffixLanes(*(jnp.asarray(a) for a in arrays)), first_tok


def build_value_batch(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]) -> ValueBatch:
    """Rewriting prompt = template around the prompt, then target_new's tokens but the last (teacher
    forcing: the token before target token j predicts it)."""
    ids, lookup, owner, targets = [], [], [], []  # targets: (target ids, prompt length) of rewriting rows
    for i, r in enumerate(requests):
        target = encode_target(tokenizer, r.target_new)
        for t in templates:
            prefix, text = fill(t, r)
            prompt = encode_prompt(tokenizer, text)
            ids.append(prompt + target[:-1])
            lookup.append(subject_last_index(tokenizer, prefix, r))
            owner.append(i)
            targets.append((target, len(prompt)))
    n, kl_start = len(requests), len(ids)
    for i, r in enumerate(requests):
        prefix = KL_TEMPLATE[: KL_TEMPLATE.index("{}")]  # "{subject} is a": the subject alone, no prompt
        ids.append(encode_prompt(tokenizer, KL_TEMPLATE.replace("{}", r.subject)))
        lookup.append(subject_last_index(tokenizer, prefix, r))
        owner.append(i)
    lanes, first_tok = pack_suffixes([len(x) for x in ids], lookup)
    slots = [(first_tok[row] + prompt_len - 1 - lookup[row] + j, tid, owner[row],
              1.0 / (len(target) * len(templates)))
             for row, (target, prompt_len) in enumerate(targets) for j, tid in enumerate(target)]
    slots += [(0, 0, 0, 0.0)] * (bucket_geometric(len(slots), 8) - len(slots))
    target_tok, target_ids, target_req, target_w = (np.asarray(x) for x in zip(*slots))
    tokens, mask, lookup_arr = pad_rows(ids, np.asarray(lookup, np.int32), pad_id(tokenizer),
                                        width=bucket_geometric(max(len(x) for x in ids), 16))
    owner = np.asarray(owner + [0] * (tokens.shape[0] - len(owner)), np.int32)
    arrays = (tokens, mask, lookup_arr, owner, np.arange(n) * len(templates))
    return ValueBatch(*(jnp.asarray(a, jnp.int32) for a in arrays), lanes=lanes,
                      target_tok=jnp.asarray(target_tok, jnp.int32), target_ids=jnp.asarray(target_ids, jnp.int32),
                      target_req=jnp.asarray(target_req, jnp.int32), target_w=jnp.asarray(target_w, jnp.float32),
                      kl_tok=jnp.asarray(first_tok[kl_start:kl_start + n]),
                      prefix_width=min(int(tokens.shape[1]), bucket_geometric(max(max(lookup), 1), 8)))


def request_digest(request: EditRequest) -> str:
    """What a request's value depends on (prompt, subject, target_new), as a short hash."""
    text = json.dumps([request.prompt, request.subject, request.target_new])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ValuesFor:
    """What a set of values was computed for; the editor refuses values made for anything else.

    model: jaxedit.cache.model_fingerprint of the params they were optimised on.
    layer, site: the layer whose output they replace, and where ("mlp" or "resid").
    requests: request_digest of each request, in order.
    """

    model: str
    layer: int
    site: str
    requests: tuple[str, ...]

    def mismatch(self, other: "ValuesFor") -> list[str]:
        """What differs from `other`, in words (empty when they agree)."""
        out = []
        if self.layer != other.layer:
            out.append(f"layer {self.layer} instead of {other.layer}")
        if self.site != other.site:
            out.append(f"site {self.site!r} instead of {other.site!r}")
        if len(self.requests) != len(other.requests):
            out.append(f"{len(self.requests)} requests instead of {len(other.requests)}")
        else:
            wrong = [i for i, (a, b) in enumerate(zip(self.requests, other.requests)) if a != b]
            if wrong:
                out.append(f"other requests at position(s) {wrong[:8]}" + (" ..." if len(wrong) > 8 else ""))
        if self.model != other.model:
            out.append(f"another model (fingerprint {self.model} instead of {other.model})")
        return out


@flax.struct.dataclass
class Values:
    """Per request (n, ·): target = init + delta, where init is the edited layer's output at the
    subject's last token of the bare prompt (ROME: MLP output; MEMIT/EMMET: residual output).

    made_for: what they were computed for (ValuesFor; static, not a pytree leaf), set by
    compute_values; editor.edit checks it against the edit it is asked to make.
    """

    target: jax.Array
    init: jax.Array
    delta: jax.Array
    loss: jax.Array
    nll: jax.Array
    steps: jax.Array
    made_for: ValuesFor | None = flax.struct.field(pytree_node=False, default=None)

    def select(self, indices) -> "Values":
        """The values of some requests (an index, a slice or a sequence of indices), identity kept."""
        idx = np.arange(self.target.shape[0])[indices]
        idx = np.atleast_1d(idx)
        made_for = None if self.made_for is None else dataclasses.replace(
            self.made_for, requests=tuple(self.made_for.requests[i] for i in idx))
        arrays = {f: getattr(self, f)[jnp.asarray(idx)] for f in ("target", "init", "delta", "loss", "nll", "steps")}
        return Values(**arrays, made_for=made_for)


def _safe_norm(x):
    """||x|| over the last axis with gradient 0 (not NaN) at x = 0, like torch.norm."""
    sq = jnp.sum(x * x, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "hp", "site", "window", "remat"))
def optimise_values(params, cfg, batch: ValueBatch, layer, hp: ValueHparams, site: str,
                    window: int | None = None, remat: bool = False) -> Values:
    """The batched value optimisation (losses as in the ROME/MEMIT reference implementations):

    loss_r = mean over r's rewriting prompts of the mean-token NLL of target_new
             + kl_factor * KL(p_delta || p_0) of the next-token distribution at the subject's last
               token of "{subject} is a" (where the reference implementations read it)
             + v_weight_decay * ||delta_r|| / ||init_r||^2,
    Adam(v_lr) for at most v_num_grad_steps evaluations, delta_r clamped to clamp_norm_factor *
    ||init_r||, request r frozen once loss_r < early_stop_loss, or (hp.most_probable_stop, ENCORE's
    most-probable early stopping) once every token of target_new is the most probable token, teacher
    forced, on every one of r's rewriting prompts. The requests' losses are independent and Adam is
    elementwise, so optimising them jointly equals optimising each alone.

    Prefix caching: nothing before the subject's last token depends on delta (causal attention), and
    no layer up to `layer` does. So one pass fills a key/value cache, and each step runs only the
    slots from the subject's last token on through the layers after `layer`, packed densely into
    lanes (batch.lanes) that attend to their rows' cached prefixes, masked to each row's own segment.

    window: the last layers the differentiated loop scans (static; layer_window(cfg, layer + 1), so
    that `layer` stays data and a few programs serve every layer). None: all layers. A window that
    does not reach layer + 1 gives NaN values (which the editor refuses), never wrong ones.
    remat: rematerialise each layer of the differentiated loop (static): the same values with one
    layer's activations held instead of the window's (see benchmarks/memory_plan.py: what lets a
    large chunk of requests fit on one accelerator), for about a third more compute per step.
    """
    window = cfg.num_hidden_layers if window is None else window
    n, m = batch.kl_tok.shape[0], batch.target_tok.shape[0]
    rows, t = batch.tokens.shape
    lanes = batch.lanes
    capture = Capture(layers=jnp.reshape(layer, (1,)), positions=batch.lookup[:, None])
    h_layer, captured = run_layers(params, cfg, embed(params, batch.tokens), batch.mask, last_layer=layer,
                                   capture=capture)
    outputs = captured.mlp_out if site == "mlp" else captured.resid_out
    init = outputs[0, batch.first_row, 0].astype(jnp.float32)  # (n, D)
    init_norm = jnp.linalg.norm(init, axis=-1)

    # Fill the rows' caches of the later layers at delta = 0 over their prefixes (the slots before
    # the subject's last token, valid at any delta), then copy each row's stretch into its lane.
    positions = rope_positions(batch.mask)
    p = batch.prefix_width or t
    prefix_slots = jnp.broadcast_to(jnp.arange(p), (rows, p))
    _, row_caches = run_layers_cached(params, cfg, h_layer[:, :p], positions[:, :p], prefix_slots,
                                      batch.mask[:, :p], empty_kv_cache(cfg, rows, p), first_layer=layer + 1,
                                      key_positions=positions[:, :p])
    # Only the window's layers enter the loop, sliced here once (a slice inside it is copied per step).
    prefix = window_layers(cfg, window, tuple(c[:, lanes.cache_row, lanes.cache_slot] for c in row_caches))
    loop_params = {**params, "layers": window_layers(cfg, window, params["layers"])}
    n_lanes, width = lanes.row.shape
    lane_slots = jnp.broadcast_to(jnp.arange(width), (n_lanes, width))
    h_lanes = h_layer[lanes.row, lanes.slot]  # (Lanes, W, D)
    pos_lanes = positions[lanes.row, lanes.slot]
    # a sliding window (cfg.sliding_window) is counted in the rows' own RoPE positions
    self_bias = lm.attention_bias(lane_slots, lane_slots, lanes.end > 0, lanes.end, window=cfg.sliding_window,
                                  query_rope_positions=pos_lanes, key_rope_positions=pos_lanes)
    # a row's cached prefix is seen by its lane tokens: placed at the row's first lane slot
    prefix_bias = lm.attention_bias(lane_slots, lanes.cache_start, lanes.cache_end > 0, lanes.cache_end,
                                    window=cfg.sliding_window, query_rope_positions=pos_lanes,
                                    key_rope_positions=positions[lanes.cache_row, lanes.cache_slot])
    owner_lanes = batch.owner[lanes.row]
    d = h_lanes.shape[-1]
    w_out = unembedding(params, cfg)

    def log_probs(h):
        return jax.nn.log_softmax(lm.linear(final_hidden(params, cfg, h), w_out).astype(jnp.float32), axis=-1)

    def losses(delta, ref_kl, first):
        h = h_lanes + (lanes.inject[..., None] * delta[owner_lanes]).astype(h_lanes.dtype)
        h = run_layers_over_prefix(loop_params, cfg, h, pos_lanes, self_bias, prefix, prefix_bias,
                                   first_layer=layer + 1, window=window, remat=remat)
        h = h.reshape(-1, d)
        # one unembedding for the target and KL rows: at a small batch it is bound by reading (V, D)
        lp = log_probs(h[jnp.concatenate([batch.target_tok, batch.kl_tok])])  # (M + n, V)
        lp, kl_lp = lp[:m], lp[m:]
        tok_lp = jnp.take_along_axis(lp, batch.target_ids[:, None], axis=-1)[:, 0]
        nll = jax.ops.segment_sum(-tok_lp * batch.target_w, batch.target_req, num_segments=n)
        # ENCORE's most-probable criterion: every target token is the top token on every prompt
        top = (jnp.argmax(lp, axis=-1) == batch.target_ids) | (batch.target_w == 0)  # padding slots agree
        most_probable = jax.ops.segment_min(top.astype(jnp.int32), batch.target_req, num_segments=n) > 0
        # The first evaluation is at delta = 0: its own distribution is the reference (KL and its
        # gradient are 0 there either way), which saves a separate reference pass.
        ref_kl = jnp.where(first, jax.lax.stop_gradient(kl_lp), ref_kl)
        kl = jnp.sum(jnp.exp(kl_lp) * (kl_lp - ref_kl), axis=-1)
        per_request = nll + hp.kl_factor * kl + hp.v_weight_decay * _safe_norm(delta) / init_norm ** 2
        return jnp.sum(per_request), (per_request, nll, kl_lp, most_probable)

    zeros = jnp.zeros_like(init)
    opt = optax.adam(hp.v_lr)
    max_norm = hp.clamp_norm_factor * init_norm

    def cond(state):
        it, _, _, done, *_ = state
        return (it < hp.v_num_grad_steps) & ~jnp.all(done)

    def body(state):
        it, delta, opt_state, done, loss, nll, steps, ref_kl = state
        (_, (per_request, per_nll, kl_lp, most_probable)), grad = jax.value_and_grad(losses, has_aux=True)(
            delta, ref_kl, it == 0)
        ref_kl = jax.lax.stop_gradient(jnp.where(it == 0, kl_lp, ref_kl))
        loss = jnp.where(done, loss, per_request)
        nll = jnp.where(done, nll, per_nll)
        done = (done | (per_request < hp.early_stop_loss) | (it == hp.v_num_grad_steps - 1)
                | (hp.most_probable_stop & most_probable))
        updates, new_state = opt.update(grad, opt_state, delta)
        stepped = delta + updates
        norm = jnp.linalg.norm(stepped, axis=-1)
        stepped = stepped * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))[:, None]
        delta = jnp.where(done[:, None], delta, stepped)
        steps = steps + (~done).astype(jnp.int32)
        return it + 1, delta, new_state, done, loss, nll, steps, ref_kl

    state = (jnp.int32(0), zeros, opt.init(zeros), jnp.zeros(n, bool), jnp.zeros(n), jnp.zeros(n),
             jnp.zeros(n, jnp.int32), jnp.zeros((n, w_out.shape[0]), jnp.float32))
    _, delta, _, _, loss, nll, steps, _ = jax.lax.while_loop(cond, body, state)
    covered = layer + 1 >= cfg.num_hidden_layers - window
    delta = jnp.where(covered, delta, jnp.nan)
    return Values(target=init + delta, init=init, delta=delta, loss=loss, nll=nll, steps=steps)


def _window(cfg, layer: int) -> int:
    """The layer window of the value loop for edits at `layer` (the layers after it)."""
    return layer_window(cfg, layer + 1)


def lower_values(params, cfg, batch: ValueBatch, layer: int, hp: ValueHparams, site: str, remat: bool = False):
    """optimise_values lowered for this batch's shapes as compute_values calls it (for compiling ahead
    of time: `.compile()`)."""
    return optimise_values.lower(params, cfg, batch, jnp.int32(layer), hp, site, window=_window(cfg, layer),
                                 remat=remat)


def compute_values(params, cfg, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                   layer: int, hp: ValueHparams, site: str = "resid", chunk_size: int = 64,
                   remat: bool = False) -> Values:
    """Values for all requests, optimised together in chunks of `chunk_size` requests (remat: see
    optimise_values; for chunks too large for the device otherwise).

    site: "resid" (MEMIT/EMMET: the layer's residual output) or "mlp" (ROME: its MLP output); the
    delta is injected at the same place either way (the MLP output is the last term of the residual).
    """
    if site not in ("resid", "mlp"):
        raise ValueError(f"site must be 'resid' or 'mlp', got {site!r}")
    if hp.v_loss_layer not in (-1, cfg.num_hidden_layers - 1):
        raise ValueError(f"v_loss_layer={hp.v_loss_layer}: only the last layer is supported")
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"unknown layer {layer}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    made_for = ValuesFor(model=model_fingerprint(params, cfg), layer=int(layer), site=site,
                         requests=tuple(request_digest(r) for r in requests))
    parts = []
    for start in range(0, len(requests), chunk_size):
        chunk = requests[start:start + chunk_size]
        batch = build_value_batch(tokenizer, chunk, templates)
        lengths = np.asarray(jax.device_get(batch.mask)).sum(axis=1)
        check_lengths(lengths, cfg, f"a rewriting prompt (with its target) of case(s) {[r.case_id for r in chunk]}")
        check_token_ids(np.asarray(jax.device_get(batch.tokens)), cfg, "the value optimisation's prompts")
        batch = rows_over_data(mesh_of(params), batch)  # on a mesh, lanes and rows over its data axis
        parts.append(optimise_values(params, cfg, batch, jnp.int32(layer), hp, site, window=_window(cfg, layer),
                                     remat=remat))
    values = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    return values.replace(made_for=made_for)
