"""The Llama decoder as a pure function of a parameter pytree, with functional capture and injection.

Parameters (names follow transformers so checkpoints map one-to-one; layers stacked on axis 0):

    {"embed_tokens": (V, D),
     "layers": {"input_layernorm": (L, D), "q_proj": (L, H*E, D), "k_proj": (L, K*E, D),
                "v_proj": (L, K*E, D), "o_proj": (L, D, H*E), "post_attention_layernorm": (L, D),
                "gate_proj": (L, F, D), "up_proj": (L, F, D), "down_proj": (L, D, F)},
     "norm": (D,),
     "lm_head": (V, D)}        # absent when cfg.tie_word_embeddings

with, when cfg.qkv_bias (Qwen2), the projections' biases "q_bias": (L, H*E), "k_bias" and "v_bias":
(L, K*E) in "layers".

Because layers are stacked and scanned, every layer index (capture sites, injection layer, the range
of layers run) is data: choosing another layer never recompiles.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import blocked_attention
from . import math as lm
from .config import LlamaConfig

Params = dict[str, Any]

LAYER_PARAM_NAMES = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                     "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")
QKV_BIAS_NAMES = ("q_bias", "k_bias", "v_bias")


def layer_param_names(cfg: LlamaConfig) -> tuple[str, ...]:
    """The per-layer parameters of cfg's architecture (the Llama ones, and Qwen2's q/k/v biases)."""
    return LAYER_PARAM_NAMES + (QKV_BIAS_NAMES if cfg.qkv_bias else ())


def param_shapes(cfg: LlamaConfig) -> Params:
    """The shape of every parameter, as a pytree of tuples (used to check checkpoints)."""
    d, f, e, l = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_hidden_layers
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {
        "embed_tokens": (cfg.vocab_size, d),
        "layers": {
            "input_layernorm": (l, d), "q_proj": (l, h * e, d), "k_proj": (l, k * e, d),
            "v_proj": (l, k * e, d), "o_proj": (l, d, h * e), "post_attention_layernorm": (l, d),
            "gate_proj": (l, f, d), "up_proj": (l, f, d), "down_proj": (l, d, f),
        },
        "norm": (d,),
    }
    if cfg.qkv_bias:
        shapes["layers"].update(q_bias=(l, h * e), k_bias=(l, k * e), v_bias=(l, k * e))
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    return shapes


def init_params(cfg: LlamaConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random parameters of the right shapes (normal weights and biases, unit norms), in cfg.dtype."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(rng, len(leaves))
    out = []
    for path, shape, key in zip(paths, leaves, keys):
        if "norm" in path:
            arr = 1.0 + 0.1 * jax.random.normal(key, shape)
        else:
            arr = std * jax.random.normal(key, shape)
        out.append(arr.astype(cfg.jnp_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


DECODER_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matrices_as(params: Params, dtype) -> Params:
    """The decoder layers' matrices in `dtype`, everything else as it is.

    With bfloat16 matrices under a float32 config this is mixed-precision inference: every layer
    matmul multiplies in bfloat16 and sums in float32 (math.linear), while the residual stream,
    norms, attention softmax and the unembedding stay float32. It halves the matrices' memory and,
    where the hardware has bfloat16 dot instructions, roughly doubles their speed.
    """
    layers = {name: (w.astype(dtype) if name in DECODER_MATRICES else w) for name, w in params["layers"].items()}
    return {**params, "layers": layers}


# ------------------------------------------------------------------------- sites
@flax.struct.dataclass
class Capture:
    """Where to read activations: layers (Lc,) and token slots (B, P) of each sequence."""

    layers: jax.Array
    positions: jax.Array


@flax.struct.dataclass
class Captured:
    """Activations at the capture sites, each (Lc, B, P, ·).

    mlp_in: the down_proj input (F), the key of the editors. mlp_out: the down_proj output (D).
    resid_out: the layer's residual-stream output (D).
    """

    mlp_in: jax.Array
    mlp_out: jax.Array
    resid_out: jax.Array


@flax.struct.dataclass
class Injection:
    """Adds delta (B, P, D) to the residual output of `layer` at token slots `positions` (B, P).

    Slots < 0 are ignored. Adding to a layer's residual output is the same as adding to its MLP
    output (the MLP output is the last term summed into the residual), so this one site serves both
    MEMIT (residual) and ROME (MLP output) value optimisation.
    """

    layer: jax.Array
    positions: jax.Array
    delta: jax.Array


@flax.struct.dataclass
class DownProjUpdates:
    """Low-rank additions to down_proj that differ from token to token: many edited models in one run.

    Token (b, t) of group g = token_group[b, t] runs layer layers[d] with the down_proj weight
    W + sum over the columns m with column_group[m] == g of right[d, m] (x) left[d, :, m], i.e. its MLP
    output gains (mlp_in @ left[d])[..., m] * right[d, m] over its own columns only. A rank-r edit of
    one or several layers is r columns of one group; groups < 0 (padding tokens, padding columns)
    match nothing. Each token then computes what the model edited by its own group's update computes,
    without a copy of any weight: independent edits of one model are scored in one pass.

    layers: (Ld,) edited layers; left: (Ld, F, M); right: (Ld, M, D); column_group: (M,);
    token_group: (B, T).
    """

    layers: jax.Array
    left: jax.Array
    right: jax.Array
    column_group: jax.Array
    token_group: jax.Array

    def mlp_out_change(self, i, mlp_in: jax.Array) -> jax.Array:
        """(B, T, D) added to layer i's MLP output for mlp_in (B, T, F) (0 at layers not edited)."""
        own = (self.token_group[..., None] == self.column_group) & (self.token_group[..., None] >= 0)
        change = jnp.zeros(mlp_in.shape[:-1] + (self.right.shape[-1],), mlp_in.dtype)
        for d in range(self.layers.shape[0]):  # static: a few edited layers
            coeff = jnp.where(own, mlp_in @ self.left[d].astype(mlp_in.dtype), 0)  # (B, T, M)
            change = change + jnp.where(i == self.layers[d], coeff @ self.right[d].astype(mlp_in.dtype), 0)
        return change


# ------------------------------------------------------------------------ forward
def rope_positions(mask: jax.Array) -> jax.Array:
    """RoPE positions from a (B, S) padding mask: 0, 1, ... counted over real tokens only."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x (B, T, C), positions (B, P) -> (B, P, C); out-of-range slots are clipped."""
    idx = jnp.clip(positions, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def attention_block(cfg: LlamaConfig, lp: Params, h, cos, sin, bias, kv=None, write_slots=None,
                    prefix=None, query_block: int | None = None):
    """Self-attention sub-layer of one layer's params lp (B, T, D) -> (B, T, D).

    With kv=(k_cache, v_cache) (B, S, K, E), this step's keys and values are written at cache slots
    write_slots (B, T) (any slots per row) and the queries attend over the whole cache; returns
    (h, new kv). With prefix=(k, v, bias), the queries also attend to read-only keys and values
    (B, S, K, E) of earlier tokens under bias (B, 1, T, S), in the same softmax. With query_block
    (no cache, no prefix, a causal bias), attention runs in blocks of that many query slots
    (blocked_attention: the same result, faster on long rows).
    """
    b, t, _ = h.shape
    x = lm.rms_norm(h, lp["input_layernorm"], cfg.rms_norm_eps)

    def project(name, heads):
        y = lm.linear(x, lp[f"{name}_proj"])
        if cfg.qkv_bias:
            y = y + lp[f"{name}_bias"].astype(y.dtype)
        return y.reshape(b, t, heads, cfg.head_dim)

    q = project("q", cfg.num_attention_heads)
    k, v = project("k", cfg.num_key_value_heads), project("v", cfg.num_key_value_heads)
    q, k = lm.apply_rope(q, cos, sin), lm.apply_rope(k, cos, sin)
    if kv is not None:
        rows = jnp.arange(b)[:, None]
        k = kv[0].at[rows, write_slots].set(k.astype(kv[0].dtype))
        v = kv[1].at[rows, write_slots].set(v.astype(kv[1].dtype))
    if query_block is not None:
        if kv is not None or prefix is not None:
            raise ValueError("attention in query blocks takes neither a cache nor a prefix")
        attn = blocked_attention.causal_block_attention(q, k, v, bias, query_block)
    else:
        blocks = ((k, v, bias),) if prefix is None else (prefix, (k, v, bias))
        attn = lm.attention_over_blocks(q, blocks)
    h = h + lm.linear(attn.reshape(b, t, -1), lp["o_proj"])
    return h, (k, v)


def mlp_block(cfg: LlamaConfig, lp: Params, h):
    """MLP sub-layer: returns (h + mlp_out, mlp_in (B, T, F), mlp_out (B, T, D))."""
    x = lm.rms_norm(h, lp["post_attention_layernorm"], cfg.rms_norm_eps)
    mlp_in = lm.swiglu_mlp_input(x, lp["gate_proj"], lp["up_proj"])
    mlp_out = lm.linear(mlp_in, lp["down_proj"])
    return h + mlp_out, mlp_in, mlp_out


def layer_context(cfg: LlamaConfig, mask: jax.Array, positions: jax.Array | None = None,
                  key_ends: jax.Array | None = None):
    """(cos, sin, bias) shared by all layers for a (B, T) padding mask without a cache.

    positions: (B, T) RoPE positions (default: counted over the mask's real tokens).
    key_ends: (B, T) subtree ends, for rows packing a token tree (see math.attention_bias).
    """
    b, t = mask.shape
    positions = rope_positions(mask) if positions is None else positions
    cos, sin = lm.rope_angles(cfg, positions)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    return cos, sin, lm.attention_bias(slots, slots, mask, key_ends, window=cfg.sliding_window,
                                       query_rope_positions=positions, key_rope_positions=positions)


def decoder_layer(cfg: LlamaConfig, lp: Params, h, cos, sin, bias, query_block: int | None = None):
    """One decoder layer without a cache: returns (h_out, mlp_in (B, T, F), mlp_out (B, T, D)).

    query_block: with a causal bias, attention in blocks of this many query slots
    (blocked_attention; the same result, faster on long rows).
    """
    h, _ = attention_block(cfg, lp, h, cos, sin, bias, query_block=query_block)
    return mlp_block(cfg, lp, h)


def scan_layers(params: Params, cfg: LlamaConfig, carry, active, skipped, *, first_layer: int | jax.Array = 0,
                last_layer: int | jax.Array | None = None, per_layer: tuple = (), stop_after_last: bool = False,
                window: int | None = None, remat: bool = False):
    """The one loop over the stacked layers that every forward variant shares.

    Layer i runs `active(i, layer_params, carry, *per_layer_i)` when first_layer <= i <= last_layer
    (both data: another range never recompiles) and `skipped(i, carry, *per_layer_i)` otherwise;
    each returns (carry, y) with y of the same structure, stacked over layers in the result.

    Args:
      per_layer: arrays with a leading layer axis handed to both functions layer by layer (e.g. the
        key/value caches).
      stop_after_last: run only first_layer..last_layer, in a while loop (a data-dependent trip
        count, so no step is spent on later layers, and a carry the loop updates in place). Then
        `skipped` is not used, ys are None, per_layer must be empty, and the loop cannot be
        differentiated in reverse mode (corpus statistics, not the value optimisation).
      window: scan only the last `window` layers (static), without a conditional: a layer of the
        window outside first_layer..last_layer runs `active` too and its result is discarded by a
        select. For reverse-mode differentiation: a conditional inside a differentiated scan stacks
        its operands (the layer's weights) as residuals at every layer, which more than doubles the
        time of a small batch. The caller keeps first_layer >= num_hidden_layers - window, and pays
        for the window's extra layers (see `layer_window`). params["layers"] and per_layer may hold
        all layers or only the window's (`window_layers`: sliced once, outside a loop that runs
        this one many times, since XLA copies the slice wherever it is taken).
      remat: rematerialise each layer in reverse-mode differentiation (jax.checkpoint of the scan
        step): the backward pass keeps only each layer's input and recomputes the rest, so a
        differentiated loop holds one layer's activations instead of every layer's (for large
        value-optimisation batches), at about one more forward pass of compute.
    Returns:
      (final carry, ys stacked on a leading layer axis).
    """
    last_layer = cfg.num_hidden_layers - 1 if last_layer is None else last_layer
    if stop_after_last:
        if per_layer:
            raise ValueError("scan_layers(stop_after_last=True) takes no per_layer arrays")

        def body(state):
            i, c = state
            lp = jax.tree_util.tree_map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False),
                                        params["layers"])
            return i + 1, active(i, lp, c)[0]

        start = jnp.asarray(first_layer, jnp.int32)
        _, carry = jax.lax.while_loop(lambda state: state[0] <= last_layer, body, (start, carry))
        return carry, None

    if window is not None:
        if not 1 <= window <= cfg.num_hidden_layers:
            raise ValueError(f"window={window}: must be 1..{cfg.num_hidden_layers} layers")
        start = cfg.num_hidden_layers - window

        def windowed_step(carry, xs):
            i, lp, extra = xs
            run = (i >= first_layer) & (i <= last_layer)
            ran, kept = active(i, lp, carry, *extra), skipped(i, carry, *extra)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(run, a, b), ran, kept)

        tail, extra = window_layers(cfg, window, (params["layers"], tuple(per_layer)))
        step = jax.checkpoint(windowed_step) if remat else windowed_step
        return jax.lax.scan(step, carry, (jnp.arange(start, cfg.num_hidden_layers), tail, extra))

    def step(carry, xs):
        i, lp, extra = xs
        run = (i >= first_layer) & (i <= last_layer)
        return jax.lax.cond(run, lambda c: active(i, lp, c, *extra), lambda c: skipped(i, c, *extra), carry)

    return jax.lax.scan(jax.checkpoint(step) if remat else step, carry,
                        (jnp.arange(cfg.num_hidden_layers), params["layers"], tuple(per_layer)))


def run_layers(params: Params, cfg: LlamaConfig, h: jax.Array, mask: jax.Array, *,
               first_layer: int | jax.Array = 0, last_layer: int | jax.Array | None = None,
               capture: Capture | None = None, inject: Injection | None = None,
               positions: jax.Array | None = None, key_ends: jax.Array | None = None,
               updates: DownProjUpdates | None = None):
    """Runs decoder layers first_layer..last_layer (inclusive, both data) on the residual stream.

    Args:
      h: (B, T, D) residual stream entering first_layer.
      mask: (B, T) 1 for real tokens, 0 for padding (left or right).
      positions, key_ends: for rows packing a tree of tokens (see layer_context).
      updates: per-token low-rank down_proj updates (DownProjUpdates; captured mlp_out includes them).
    Returns:
      (h, captured): the residual stream after last_layer, and Captured (or None).
    """
    b, t, _ = h.shape
    cos, sin, bias = layer_context(cfg, mask, positions, key_ends)
    batch_idx = jnp.arange(b)[:, None]

    def active(i, lp, h):
        h, mlp_in, mlp_out = decoder_layer(cfg, lp, h, cos, sin, bias)
        if updates is not None:
            change = updates.mlp_out_change(i, mlp_in)
            h, mlp_out = h + change, mlp_out + change
        if inject is not None:
            valid = (inject.positions >= 0) & (i == inject.layer)
            delta = jnp.where(valid[..., None], inject.delta, 0).astype(h.dtype)
            h = h.at[batch_idx, jnp.clip(inject.positions, 0, t - 1)].add(delta)
        if capture is None:
            return h, ()
        p = capture.positions
        return h, (_gather_positions(mlp_in, p), _gather_positions(mlp_out, p), _gather_positions(h, p))

    def skipped(i, h):
        if capture is None:
            return h, ()
        p = capture.positions.shape[1]
        z = lambda c: jnp.zeros((b, p, c), h.dtype)
        return h, (z(cfg.intermediate_size), z(cfg.hidden_size), z(cfg.hidden_size))

    h, ys = scan_layers(params, cfg, h, active, skipped, first_layer=first_layer, last_layer=last_layer)
    captured = None
    if capture is not None:
        captured = Captured(*(y[capture.layers] for y in ys))
    return h, captured


def empty_kv_cache(cfg: LlamaConfig, batch: int, slots: int):
    """Zeroed key/value caches (L, B, S, K, E) for run_layers_cached."""
    shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype)


def run_layers_cached(params: Params, cfg: LlamaConfig, h: jax.Array, positions: jax.Array,
                      write_slots: jax.Array, key_mask: jax.Array, caches, *,
                      first_layer: int | jax.Array = 0, last_layer: int | jax.Array | None = None,
                      key_positions: jax.Array | None = None):
    """Runs layers on some tokens of each sequence, attending over a key/value cache.

    Args:
      h: (B, T, D) residual stream of the tokens being run.
      positions: (B, T) their RoPE positions. write_slots: (B, T) their cache slots (causality is
        by slot: a token sees cache slots <= its own).
      key_mask: (B, S) which cache slots hold real tokens once these are written.
      caches: (k, v), each (L, B, S, K, E).
      key_positions: (B, S) the RoPE positions of the cache slots once these are written; needed
        (ValueError otherwise) by configs with a sliding window, which is measured in RoPE positions.
    Returns:
      (h, caches): caches updated at write_slots for the layers run.

    Serves generation (prefill, then one slot per step) and value optimisation (only the slots from
    the subject's last token on are recomputed; earlier slots come from the cache).
    """
    b = h.shape[0]
    s = caches[0].shape[2]
    if cfg.sliding_window is not None and key_positions is None:
        raise ValueError(f"run_layers_cached: this {cfg.architecture} config attends within a sliding window of "
                         f"{cfg.sliding_window} positions; pass key_positions (the cache slots' RoPE positions)")
    cos, sin = lm.rope_angles(cfg, positions)
    bias = lm.attention_bias(write_slots, jnp.broadcast_to(jnp.arange(s), (b, s)), key_mask,
                             window=cfg.sliding_window, query_rope_positions=positions,
                             key_rope_positions=key_positions)

    def active(i, lp, h, k_cache, v_cache):
        h, kv = attention_block(cfg, lp, h, cos, sin, bias, (k_cache, v_cache), write_slots)
        h, _, _ = mlp_block(cfg, lp, h)
        return h, kv

    return scan_layers(params, cfg, h, active, lambda i, h, k, v: (h, (k, v)), first_layer=first_layer,
                       last_layer=last_layer, per_layer=tuple(caches))


def run_layers_over_prefix(params: Params, cfg: LlamaConfig, h: jax.Array, positions: jax.Array,
                           bias: jax.Array, prefix, prefix_bias: jax.Array, *,
                           first_layer: int | jax.Array = 0, last_layer: int | jax.Array | None = None,
                           window: int | None = None, remat: bool = False):
    """Runs layers on tokens that attend to each other and to a read-only cache of earlier tokens.

    Args:
      h: (B, T, D) residual stream of the tokens being run; positions: (B, T) their RoPE positions.
      bias: (B, 1, T, T) which of these tokens each one sees (math.attention_bias, with cfg's
        sliding window if it has one; prefix_bias too).
      prefix: (k, v), each (L, B, S, K, E): keys and values of the earlier tokens (e.g. from
        run_layers_cached); prefix_bias: (B, 1, T, S) which of them each token sees.
      window: scan only the last `window` layers, without a conditional (scan_layers); for reverse-mode
        differentiation, with first_layer inside the window (layer_window(cfg, first_layer)).
      remat: rematerialise each layer under reverse-mode differentiation (scan_layers).
    Returns:
      h after last_layer.

    The value optimisation's inner loop: the prefix is constant, so unlike run_layers_cached nothing
    is written into it, and differentiating h never touches it.
    """
    cos, sin = lm.rope_angles(cfg, positions)

    def active(i, lp, h, k_prefix, v_prefix):
        h, _ = attention_block(cfg, lp, h, cos, sin, bias, prefix=(k_prefix, v_prefix, prefix_bias))
        h, _, _ = mlp_block(cfg, lp, h)
        return h, ()

    h, _ = scan_layers(params, cfg, h, active, lambda i, h, k, v: (h, ()), first_layer=first_layer,
                       last_layer=last_layer, per_layer=tuple(prefix), window=window, remat=remat)
    return h


RESTORE_RESID, RESTORE_MLP, RESTORE_ATTN = 0, 1, 2


@flax.struct.dataclass
class Restoration:
    """States put back into a run (causal tracing), per row and token slot.

    At token slots `slots` (B, P) of each row (slots < 0 are ignored; a row's slots are distinct), in
    layers first..last (B, P) (inclusive), the output of `kind` (B, P) is replaced by
    values[layer, source]:

      RESTORE_RESID: the layer's residual output (h_out = value);
      RESTORE_MLP:   the MLP output (h_out = h_mid + value);
      RESTORE_ATTN:  the attention output (h_mid = h_in + value; the MLP runs on that).

    values: (L, N, D), a table that source (B, P) indexes, so that many rows restoring the same state
    share one copy. Kinds and layers are data: any mix of restorations runs in one program.
    """

    slots: jax.Array
    kind: jax.Array
    first: jax.Array
    last: jax.Array
    source: jax.Array
    values: jax.Array


def run_layers_restoring(params: Params, cfg: LlamaConfig, h: jax.Array, positions: jax.Array, bias: jax.Array,
                         restore: Restoration, prefix=None, prefix_bias: jax.Array | None = None,
                         prefix_rows: jax.Array | None = None, *, first_layer: int | jax.Array = 0,
                         last_layer: int | jax.Array | None = None):
    """run_layers_over_prefix with states restored (Restoration) as the layers run.

    Args:
      h, positions, bias: as in run_layers_over_prefix.
      restore: what to put back where.
      prefix: (k, v), each (L, R, S, K, E), keys and values of earlier tokens, or None (the rows hold
        whole sequences); prefix_bias (B, 1, T, S).
      prefix_rows: (B,) the prefix row each row attends to (default: its own), taken one layer at a
        time, so that many rows share a few cached prefixes without a copy of every layer's.
    Returns:
      h after last_layer.
    """
    t = h.shape[1]
    cos, sin = lm.rope_angles(cfg, positions)
    hits = restore.slots[..., None] == jnp.arange(t)  # (B, P, T)

    def restored(i, kind, value):
        """(B, T) where `kind` is restored at layer i, and the (B, T, D) values there (0 elsewhere)."""
        on = hits & ((restore.kind == kind) & (restore.first <= i) & (i <= restore.last))[..., None]
        dense = jnp.sum(jnp.where(on[..., None], value[:, :, None, :], 0), axis=1)  # exact: adds zeros
        return jnp.any(on, axis=1)[..., None], dense

    def active(i, lp, h, values, *kv):
        value = values[restore.source].astype(h.dtype)  # (B, P, D)
        block = None
        if prefix is not None:
            k, v = kv if prefix_rows is None else (kv[0][prefix_rows], kv[1][prefix_rows])
            block = (k, v, prefix_bias)
        h_mid, _ = attention_block(cfg, lp, h, cos, sin, bias, prefix=block)
        on, dense = restored(i, RESTORE_ATTN, value)
        h_mid = jnp.where(on, h + dense, h_mid)
        h_out, _, _ = mlp_block(cfg, lp, h_mid)
        on, dense = restored(i, RESTORE_MLP, value)
        h_out = jnp.where(on, h_mid + dense, h_out)
        on, dense = restored(i, RESTORE_RESID, value)
        return jnp.where(on, dense, h_out), ()

    per_layer = (restore.values,) + (() if prefix is None else tuple(prefix))
    h, _ = scan_layers(params, cfg, h, active, lambda i, h, *_: (h, ()), first_layer=first_layer,
                       last_layer=last_layer, per_layer=per_layer)
    return h


def window_layers(cfg: LlamaConfig, window: int, tree):
    """The last `window` layers of every array in `tree` (leading axis: layers); arrays that already
    hold only `window` layers are kept as they are."""
    def last(x):
        if x.shape[0] == window:
            return x
        if x.shape[0] != cfg.num_hidden_layers:
            raise ValueError(f"a per-layer array of leading size {x.shape[0]}: expected "
                             f"{cfg.num_hidden_layers} layers or a window of {window}")
        return x[cfg.num_hidden_layers - window:]
    return jax.tree_util.tree_map(last, tree)


def layer_window(cfg: LlamaConfig, first_layer: int, step: int = 2) -> int:
    """The scan window (static) that covers layers first_layer.. to the last: their count rounded up to
    a multiple of `step` (at least `step`), so that a sweep over every layer compiles about L / step
    programs and runs at most step - 1 discarded layers. first_layer may be L (no layer left)."""
    if not 0 <= first_layer <= cfg.num_hidden_layers:
        raise ValueError(f"first_layer={first_layer}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    count = cfg.num_hidden_layers - first_layer
    return min(cfg.num_hidden_layers, max(step, -(-count // step) * step))


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    return params["embed_tokens"][tokens]


def unembedding(params: Params, cfg: LlamaConfig) -> jax.Array:
    """The (V, D) output matrix (the embedding when tied)."""
    return params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]


def final_hidden(params: Params, cfg: LlamaConfig, h: jax.Array) -> jax.Array:
    return lm.rms_norm(h, params["norm"], cfg.rms_norm_eps)


def logits_from_hidden(params: Params, cfg: LlamaConfig, h: jax.Array) -> jax.Array:
    """Residual stream (..., D) -> float32 logits (..., V) through the final norm and the unembedding."""
    return lm.linear(final_hidden(params, cfg, h), unembedding(params, cfg)).astype(jnp.float32)


def _default_mask(tokens, mask):
    return jnp.ones(tokens.shape, jnp.int32) if mask is None else mask


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array | None = None, *,
            capture: Capture | None = None, inject: Injection | None = None):
    """Logits (B, T, V) float32 for tokens (B, T) with padding mask (B, T).

    With `capture`, returns (logits, Captured); with `inject`, the delta is added in the forward pass.
    """
    mask = _default_mask(tokens, mask)
    h, captured = run_layers(params, cfg, embed(params, tokens), mask, capture=capture, inject=inject)
    logits = logits_from_hidden(params, cfg, h)
    return logits if capture is None else (logits, captured)


@functools.partial(jax.jit, static_argnames=("cfg",))
def residual_before(params: Params, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array,
                    layer: int | jax.Array) -> jax.Array:
    """The residual stream (B, T, D) entering `layer` (layer as data). Lets callers that change only
    layer >= `layer` (value optimisation) run the earlier layers once."""
    h, _ = run_layers(params, cfg, embed(params, tokens), mask, first_layer=0, last_layer=layer - 1)
    return h


def num_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
