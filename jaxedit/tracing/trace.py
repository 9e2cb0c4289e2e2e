"""Causal tracing of one fact (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Three kinds of runs of the fact's prompt:
  clean:     the prompt as it is; every layer's residual, MLP and attention output at every token is
             recorded, and P(object) at the last token (the object: the fact's answer token);
  corrupted: Gaussian noise added to the subject tokens' embeddings, one run per noise sample;
  restored:  a corrupted run in which one clean state is put back: a layer's residual output at one
             token, or the MLP or attention output at one token in a window of layers around a centre
             layer (model.Restoration).
The score of a restoration is P(object) averaged over the noise samples; its indirect effect is that
minus the corrupted runs' average P(object).

All restorations of a prompt (3 kinds x L layers x T tokens x noise samples) run in one jit-compiled
program (trace_fact), packed as in jaxedit.tracing.lanes: a restoration at token i runs only slots
i.. over the corrupted run's cached keys and values of the slots before i, from the first layer it
restores. naive_trace runs the same restorations one forward pass each (a reference and a baseline).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax import math as lm
from llama3_flax.model import (Capture, Restoration, embed, empty_kv_cache, logits_from_hidden, run_layers,
                               run_layers_cached, run_layers_restoring)

from jaxedit.editing.tokenize import check_lengths
from jaxedit.packing import bucket
from jaxedit.tracing.knowns import EncodedFact
from jaxedit.tracing.lanes import KIND_CODES, KINDS, Lanes, plan_lanes, restored_layers


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """noise_samples: corrupted runs per fact. noise_factor: the noise's std in units of the std of the
    subject tokens' embeddings (3, as in the paper). window: layers restored around a centre layer for
    MLP and attention outputs. length_multiple: prompts are padded to a multiple of this many tokens
    (prompts of one padded width share a compilation). chunk_tokens: lane slots run at once. seed:
    of the noise (each fact's noise is drawn from (seed, known_id))."""

    noise_samples: int = 10
    noise_factor: float = 3.0
    window: int = 10
    length_multiple: int = 2
    chunk_tokens: int = 4096
    seed: int = 0

    def __post_init__(self):
        # window 0 restores nothing and noise_samples 0 averages nothing: both would give a trace
        # of the corrupted run alone, without an error
        for name in ("noise_samples", "window", "length_multiple", "chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"TraceConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"TraceConfig.seed must be an integer >= 0, got {self.seed!r}")
        factor = self.noise_factor
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"TraceConfig.noise_factor must be a finite number >= 0, got {factor!r}")


@dataclasses.dataclass(frozen=True)
class FactTrace:
    """scores: (kinds, L, T) P(object) with each state restored, averaged over the noise samples;
    p_clean, p_corrupt: P(object) of the clean run and of the corrupted runs (averaged)."""

    fact: EncodedFact
    target: int
    p_clean: float
    p_corrupt: float
    scores: np.ndarray

    @property
    def indirect_effect(self) -> np.ndarray:
        return self.scores - self.p_corrupt


def embedding_noise_std(params, token_ids, factor: float = 3.0) -> float:
    """factor x the standard deviation of the given tokens' embeddings (all their coordinates)."""
    if not len(token_ids):
        raise ValueError("no subject tokens to measure the embeddings' spread on")
    rows = np.asarray(params["embed_tokens"])[np.asarray(token_ids)]
    return float(factor * rows.astype(np.float64).std())


def corruption_noise(fact: EncodedFact, width: int, hidden: int, std: float, samples: int, seed: int) -> np.ndarray:
    """(samples, width, hidden) Gaussian noise of `std` on the subject's tokens, 0 elsewhere; drawn
    from (seed, known_id), so a fact's noise does not depend on which other facts are traced."""
    start, end = fact.subject
    noise = np.zeros((samples, width, hidden), np.float32)
    rng = np.random.default_rng([seed, fact.fact.known_id])
    noise[:, start:end] = std * rng.standard_normal((samples, end - start, hidden))
    return noise


def _probability(params, cfg, h, target):
    """P(target) from residual streams (..., D)."""
    return jax.nn.softmax(logits_from_hidden(params, cfg, h), axis=-1)[..., target]


def _clean_run(params, cfg, tokens, length, target):
    """P(object) of the clean run, and the table of clean states (L, kinds * width, D): rows
    kind * width + token, kinds in KINDS order (the attention output read as h_mid - h_in)."""
    width = tokens.shape[0]
    x = embed(params, tokens)[None]
    mask = (jnp.arange(width) < length).astype(jnp.int32)[None]
    every = Capture(layers=jnp.arange(cfg.num_hidden_layers), positions=jnp.arange(width)[None])
    h, states = run_layers(params, cfg, x, mask, capture=every)
    entering = jnp.concatenate([x[None], states.resid_out[:-1]])
    attn = states.resid_out - states.mlp_out - entering
    table = jnp.concatenate([states.resid_out[:, 0], states.mlp_out[:, 0], attn[:, 0]], axis=1)
    return _probability(params, cfg, h[0, length - 1], target), table


def _corrupted_run(params, cfg, tokens, length, target, noise):
    """P(object) per noise sample, the residual stream entering every layer (L, S, width, D), and the
    key/value caches (L, S, width, K, E)."""
    s, width, _ = noise.shape
    x = embed(params, tokens)[None] + noise
    mask = jnp.broadcast_to((jnp.arange(width) < length).astype(jnp.int32), (s, width))
    slots = jnp.broadcast_to(jnp.arange(width), (s, width))
    every = Capture(layers=jnp.arange(cfg.num_hidden_layers), positions=slots)
    h, states = run_layers(params, cfg, x, mask, capture=every)
    entering = jnp.concatenate([x[None], states.resid_out[:-1]])
    _, caches = run_layers_cached(params, cfg, x, slots, slots, mask, empty_kv_cache(cfg, s, width),
                                  key_positions=slots)
    return _probability(params, cfg, h[:, length - 1], target), entering, caches


def _restored_chunk(params, cfg, table, entering, caches, target, lanes: Lanes):
    """P(object) (C, 2) of the restorations of one chunk of lanes."""
    c, w = lanes.token.shape
    width = caches[0].shape[2]
    start = jnp.minimum(lanes.chunk_first, cfg.num_hidden_layers - 1)  # padding chunks run no layer
    h = entering[start][lanes.sample[:, None], jnp.maximum(lanes.token, 0)]
    lane_slots = jnp.broadcast_to(jnp.arange(w), (c, w))
    positions = jnp.maximum(lanes.token, 0)  # a lane token's RoPE position is its prompt slot
    bias = lm.attention_bias(lane_slots, lane_slots, lanes.end > 0, lanes.end, window=cfg.sliding_window,
                             query_rope_positions=positions, key_rope_positions=positions)
    cached = jnp.broadcast_to(jnp.arange(width), (c, width))
    prefix_bias = lm.attention_bias(lanes.site_token - 1, cached, jnp.ones((c, width), jnp.int32),
                                    window=cfg.sliding_window, query_rope_positions=positions,
                                    key_rope_positions=cached)
    restore = Restoration(slots=lanes.slots, kind=lanes.kind, first=lanes.first, last=lanes.last,
                          source=jnp.maximum(lanes.source, 0), values=table)
    h = run_layers_restoring(params, cfg, h, positions, bias, restore, caches, prefix_bias,
                             prefix_rows=lanes.sample, first_layer=lanes.chunk_first)
    out = h[jnp.arange(c)[:, None], jnp.maximum(lanes.readout, 0)]
    return _probability(params, cfg, out, target)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _trace_program(params, cfg, tokens, length, target, noise, lanes: Lanes):
    p_clean, table = _clean_run(params, cfg, tokens, length, target)
    p_corrupt, entering, caches = _corrupted_run(params, cfg, tokens, length, target, noise)
    restored = jax.lax.map(lambda chunk: _restored_chunk(params, cfg, table, entering, caches, target, chunk), lanes)
    return p_clean, p_corrupt, restored


@functools.lru_cache(maxsize=64)
def _plan(length: int, width: int, num_layers: int, samples: int, window: int, chunk_tokens: int):
    return plan_lanes(length, width, num_layers, samples, window, chunk_tokens)


def padded_width(length: int, tc: TraceConfig) -> int:
    return bucket(length, tc.length_multiple)


def check_trace_inputs(cfg, fact: EncodedFact, target, noise_std, tc: TraceConfig) -> None:
    """ValueError naming what cannot be traced: a prompt past the model's positions, a target id outside
    its vocabulary (JAX would clamp it and trace another token), a noise std that is negative or not
    finite, a config that is not a TraceConfig."""
    if not isinstance(tc, TraceConfig):
        raise TypeError(f"tc must be a TraceConfig, got {type(tc).__name__}")
    check_lengths([len(fact.tokens)], cfg, f"the prompt of {fact.fact.name}")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < cfg.vocab_size:
        raise ValueError(f"{fact.fact.name}: target token id {target!r} is outside the model's vocabulary "
                         f"(0..{cfg.vocab_size - 1})")
    if not (isinstance(noise_std, numbers.Real) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"{fact.fact.name}: noise_std must be a finite number >= 0, got {noise_std!r}")


def trace_fact(params, cfg, fact: EncodedFact, target: int, noise_std: float, tc: TraceConfig = TraceConfig()
               ) -> FactTrace:
    """Every restoration of the fact's prompt, in one program (see the module docstring).

    target: the object's token id. noise_std: the corruption's std (embedding_noise_std).
    """
    check_trace_inputs(cfg, fact, target, noise_std, tc)
    length = len(fact.tokens)
    width = padded_width(length, tc)
    l = cfg.num_hidden_layers
    plan = _plan(length, width, l, tc.noise_samples, tc.window, tc.chunk_tokens)
    tokens = np.zeros(width, np.int32)
    tokens[:length] = fact.tokens
    noise = corruption_noise(fact, width, cfg.hidden_size, noise_std, tc.noise_samples, tc.seed)
    p_clean, p_corrupt, restored = _trace_program(params, cfg, jnp.asarray(tokens), length, target,
                                                  jnp.asarray(noise, cfg.jnp_dtype), plan.lanes)
    restored = np.asarray(restored, np.float64)
    present = plan.site >= 0
    sums = np.zeros(len(KINDS) * l * width)
    np.add.at(sums, plan.site[present], restored[present])
    scores = (sums / tc.noise_samples).reshape(len(KINDS), l, width)[:, :, :length]
    return FactTrace(fact=fact, target=int(target), p_clean=float(p_clean),
                     p_corrupt=float(np.mean(np.asarray(p_corrupt, np.float64))), scores=scores)


# ------------------------------------------------------------------- one restoration per pass
@functools.partial(jax.jit, static_argnames=("cfg",))
def _whole_run_restoring(params, cfg, tokens, length, target, noise, table, kind, token, first, last):
    """P(object) averaged over the noise samples, with one state restored, all slots and layers run."""
    s, width, _ = noise.shape
    x = embed(params, tokens)[None] + noise
    slots = jnp.broadcast_to(jnp.arange(width), (s, width))
    bias = lm.attention_bias(slots, slots, jnp.broadcast_to(jnp.arange(width) < length, (s, width)),
                             window=cfg.sliding_window, query_rope_positions=slots, key_rope_positions=slots)
    one = lambda v: jnp.full((s, 1), v, jnp.int32)
    restore = Restoration(slots=one(token), kind=one(kind), first=one(first), last=one(last),
                          source=jnp.full((s, 1), kind * width + token, jnp.int32), values=table)
    h = run_layers_restoring(params, cfg, x, slots, bias, restore)
    return jnp.mean(_probability(params, cfg, h[:, length - 1], target))


_clean_program = jax.jit(_clean_run, static_argnames=("cfg",))
_corrupted_program = jax.jit(_corrupted_run, static_argnames=("cfg",))


def naive_trace(params, cfg, fact: EncodedFact, target: int, noise_std: float, tc: TraceConfig = TraceConfig(),
                sites=None) -> FactTrace:
    """trace_fact computed one restoration per forward pass (every slot, every layer, the noise
    samples as a batch), as the reference implementation does. sites: (kind index, layer, token)
    triples to run (default all); the scores of the others are NaN."""
    check_trace_inputs(cfg, fact, target, noise_std, tc)
    length = len(fact.tokens)
    width = padded_width(length, tc)
    l = cfg.num_hidden_layers
    tokens = np.zeros(width, np.int32)
    tokens[:length] = fact.tokens
    tokens = jnp.asarray(tokens)
    noise = jnp.asarray(corruption_noise(fact, width, cfg.hidden_size, noise_std, tc.noise_samples, tc.seed),
                        cfg.jnp_dtype)
    p_clean, table = _clean_program(params, cfg, tokens, length, target)
    p_corrupt, _, _ = _corrupted_program(params, cfg, tokens, length, target, noise)
    scores = np.full((len(KINDS), l, length), np.nan)
    if sites is None:
        sites = [(k, layer, t) for k in range(len(KINDS)) for layer in range(l) for t in range(length)]
    for k, layer, t in sites:
        first, last = restored_layers(KIND_CODES[k], layer, l, tc.window)
        scores[k, layer, t] = float(_whole_run_restoring(params, cfg, tokens, length, target, noise, table,
                                                         KIND_CODES[k], t, first, last))
    return FactTrace(fact=fact, target=int(target), p_clean=float(p_clean),
                     p_corrupt=float(np.mean(np.asarray(p_corrupt, np.float64))), scores=scores)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_token(params, cfg, tokens, length):
    x = embed(params, tokens)[None]
    h, _ = run_layers(params, cfg, x, (jnp.arange(tokens.shape[0]) < length).astype(jnp.int32)[None])
    return jnp.argmax(logits_from_hidden(params, cfg, h[0, length - 1]))


def greedy_next_token(params, cfg, fact: EncodedFact, tc: TraceConfig = TraceConfig()) -> int:
    """The model's greedy next token after the fact's prompt."""
    length = len(fact.tokens)
    tokens = np.zeros(padded_width(length, tc), np.int32)
    tokens[:length] = fact.tokens
    return int(_next_token(params, cfg, jnp.asarray(tokens), length))
