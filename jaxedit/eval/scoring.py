"""Scoring (prompt, target) pairs: the mean per-token NLL of each target, teacher-forced after its prompt.

A pair's sequence is encode_prompt(prompt) (BOS kept if the tokenizer adds one) + encode_target(target)
(leading space, never a BOS); the NLL of target token j is read from the logits at the position
before it. All sequences of a call are packed into rows of `row_width` tokens as prefix trees
(pack_token_trees): sequences sharing leading tokens (the two targets of one prompt, prompts of one
relation) share those tokens' computation, a tree-shaped attention mask keeps every token to its own
ancestors, and no row is padded to the longest sequence. Rows go to the model `batch_size` at a time;
the unembedding is applied once per token that predicts a target token, never to the whole (B, T, V)
sequence. Scoring runs at the params' precision: model.matrices_as(params, jnp.bfloat16) scores with
bfloat16 matmuls (float32 sums).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_flax import model as lm_model
from llama3_flax.config import LlamaConfig
from llama3_flax.sharding import mesh_of, rows_over_data

from jaxedit import packing
from jaxedit.editing import tokenize
from jaxedit.packing import first_fit_decreasing
from jaxedit.progress import progress_bar
from jaxedit.distributed import to_host


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_tree_rows(params, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, ends: jax.Array,
                    predictor_tok: jax.Array, score_predictor: jax.Array, score_ids: jax.Array,
                    updates: lm_model.DownProjUpdates | None = None) -> jax.Array:
    """Token NLLs read from rows of packed prefix trees.

    Args:
      tokens, positions, ends: (R, W) token ids, RoPE positions (depth in the tree) and subtree ends
        (see pack_token_trees; 0 marks padding).
      predictor_tok: (U,) flat token index (row * W + slot) of each distinct predicting token: it is
        unembedded once, however many targets it predicts (a prompt's last token predicts the first
        token of both of its targets).
      score_predictor, score_ids: (M,) which predictor (index into predictor_tok) predicts each scored
        token, and that token's id.
      updates: per-token low-rank down_proj updates (each token scored under its own edit's model).
    Returns:
      (M,) float32 -log p(score_ids | the predicting token's ancestors).
    """
    h, _ = lm_model.run_layers(params, cfg, lm_model.embed(params, tokens), (ends > 0).astype(jnp.int32),
                               positions=positions, key_ends=ends, updates=updates)
    logits = lm_model.logits_from_hidden(params, cfg, h.reshape(-1, h.shape[-1])[predictor_tok])
    # token_nll(logits[score_predictor], ...) would copy an (M, V) block; gather the (M,) numbers instead
    picked = logits[score_predictor, score_ids]
    return jax.nn.logsumexp(logits, axis=-1)[score_predictor] - picked


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A tokenised (prompt, target) pair: prompt ids (BOS as the tokenizer adds it), target ids (no BOS)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[EncodedPair, ...]:
    """Tokenises (prompt, target) pairs, each distinct prompt and target once."""
    prompts: dict[str, tuple[int, ...]] = {}
    targets: dict[str, tuple[int, ...]] = {}
    out = []
    for prompt, target in pairs:
        if prompt not in prompts:
            ids = tuple(tokenize.encode_prompt(tokenizer, prompt))
            if not ids:
                raise ValueError(f"prompt {prompt!r} tokenises to nothing")
            prompts[prompt] = ids
        if target not in targets:
            targets[target] = tuple(tokenize.encode_target(tokenizer, target))
        out.append(EncodedPair(prompts[prompt], targets[target]))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TreeRow:
    """One row of packed prefix trees, in depth-first order: token ids, depths (RoPE positions) and
    the slot just after each token's subtree (a token sees exactly its ancestors and itself)."""

    tokens: tuple[int, ...]
    depths: tuple[int, ...]
    ends: tuple[int, ...]
    groups: tuple[int, ...] = ()  # per token: the group of the sequences it belongs to (see pack_token_trees)


def _prefix_tree_pieces(seqs: Sequence[Sequence[int]], width: int) -> list[tuple[list, list, list, list]]:
    """Cuts the sorted sequences into prefix trees of at most `width` tokens, in depth-first order.

    Sorted, each sequence shares its longest common prefix with the one before it, and only the
    tokens after that prefix are added, so the new tokens land in depth-first order and a token's
    subtree is the slot range [slot, end). A new piece starts at a new first token (nothing to
    share) or when the tree would outgrow the width (the shared prefix is then repeated).
    Returns per piece (tokens, depths, ends, [(sequence index, slots of its tokens)]).
    """
    pieces: list[tuple[list, list, list, list]] = []
    prev: tuple[int, ...] = ()
    prev_path: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: tuple(seqs[i])):
        seq = tuple(seqs[i])
        shared = 0
        while shared < min(len(seq), len(prev)) and seq[shared] == prev[shared]:
            shared += 1
        if shared == 0 or len(pieces[-1][0]) + len(seq) - shared > width:
            pieces.append(([], [], [], []))
            shared = 0
        tokens, depths, ends, members = pieces[-1]
        path = prev_path[:shared] + list(range(len(tokens), len(tokens) + len(seq) - shared))
        tokens += seq[shared:]
        depths += range(shared, len(seq))
        ends += [0] * (len(seq) - shared)
        for slot in path:  # every token of the path has this sequence's last token in its subtree
            ends[slot] = max(ends[slot], path[-1] + 1)
        members.append((i, path))
        prev, prev_path = seq, path
    return pieces


def pack_token_trees(seqs: Sequence[Sequence[int]], width: int, groups: Sequence[int] | None = None
                     ) -> tuple[list[TreeRow], list[tuple[int, tuple[int, ...]]]]:
    """Packs token sequences into rows of at most `width` tokens, as prefix trees.

    Sequences sharing leading tokens share those tokens' slots (_prefix_tree_pieces); the trees go
    into rows first-fit in decreasing size, which leaves little padding at the rows' ends.
    groups: one int >= 0 per sequence (e.g. the edited model it is scored under): only sequences of
    one group share slots, and each row records its tokens' groups (TreeRow.groups).
    Returns the rows and, per sequence, (row, slot of each of its tokens).
    """
    if any(len(s) > width for s in seqs):
        raise ValueError(f"a sequence of {max(len(s) for s in seqs)} tokens does not fit rows of width {width}")
    if groups is None:
        groups = [0] * len(seqs)
    if len(groups) != len(seqs) or any(int(g) < 0 for g in groups):
        raise ValueError(f"groups must give one int >= 0 per sequence ({len(seqs)}), got {len(groups)}")
    members_of: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members_of[int(g)].append(i)
    pieces, piece_group = [], []
    for g, members in members_of.items():  # trees never mix groups
        for tokens, depths, ends, local in _prefix_tree_pieces([seqs[i] for i in members], width):
            pieces.append((tokens, depths, ends, [(members[j], path) for j, path in local]))
            piece_group.append(g)
    rows: list[tuple[list, list, list, list]] = []
    paths: list = [None] * len(seqs)
    for members_of_row in first_fit_decreasing([len(p[0]) for p in pieces], width):
        rows.append(([], [], [], []))
        for piece in members_of_row:
            tokens, depths, ends, members = pieces[piece]
            offset = len(rows[-1][0])
            rows[-1][0].extend(tokens)
            rows[-1][1].extend(depths)
            rows[-1][2].extend(e + offset for e in ends)
            rows[-1][3].extend([piece_group[piece]] * len(tokens))
            for i, path in members:
                paths[i] = (len(rows) - 1, tuple(offset + s for s in path))
    return [TreeRow(tuple(t), tuple(d), tuple(e), tuple(g)) for t, d, e, g in rows], paths


@dataclasses.dataclass(frozen=True)
class LowRankEdits:
    """Edits of one model, each a low-rank change of down_proj, to score side by side in one pass.

    Edit e changes layer layers[d]'s down_proj W (D, F) by right[d][:, cols].T @ left[d][:, cols].T
    over its columns cols = (column_edit == e): its MLP output gains (mlp_in @ left[d]) @ right[d] over
    those columns (llama3_flax.model.DownProjUpdates). Build with jaxedit.eval.independent.

    layers: edited layers; left: (Ld, F, M) float32; right: (Ld, M, D) float32; column_edit: (M,).
    """

    layers: tuple[int, ...]
    left: np.ndarray
    right: np.ndarray
    column_edit: np.ndarray

    @property
    def n_edits(self) -> int:
        return int(np.max(self.column_edit)) + 1 if self.column_edit.size else 0

    def check(self, cfg: LlamaConfig) -> None:
        """Raises ValueError naming what does not fit the model."""
        ld, m = len(self.layers), len(self.column_edit)
        f, d = cfg.intermediate_size, cfg.hidden_size
        bad = [l for l in self.layers if not 0 <= l < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"edited layers {bad} are not layers of a {cfg.num_hidden_layers}-layer model")
        if np.shape(self.left) != (ld, f, m) or np.shape(self.right) != (ld, m, d):
            raise ValueError(f"low-rank factors of shapes {np.shape(self.left)} and {np.shape(self.right)}; "
                             f"expected ({ld}, {f}, {m}) and ({ld}, {m}, {d}) for {ld} layers, {m} columns")

    def device_updates(self, token_group: np.ndarray) -> lm_model.DownProjUpdates:
        """DownProjUpdates for rows whose tokens belong to edits token_group (B, T) (-1: none), with the
        columns padded to a multiple of 64 (few compiled shapes)."""
        m = len(self.column_edit)
        pad = packing.bucket(m, 64) - m
        widen = lambda a, axis: np.pad(a, [(0, pad) if k == axis else (0, 0) for k in range(a.ndim)])
        return lm_model.DownProjUpdates(
            layers=jnp.asarray(self.layers, jnp.int32), left=jnp.asarray(widen(self.left, 2), jnp.float32),
            right=jnp.asarray(widen(self.right, 1), jnp.float32),
            column_group=jnp.asarray(np.pad(self.column_edit, (0, pad), constant_values=-2), jnp.int32),
            token_group=jnp.asarray(token_group, jnp.int32))


def score_encoded(params, cfg: LlamaConfig, encoded: Sequence[EncodedPair], batch_size: int = 16,
                  row_width: int = 64, progress: bool | None = None, *, edit_of_pair: Sequence[int] | None = None,
                  edits: LowRankEdits | None = None) -> np.ndarray:
    """Mean target NLL (N,) float64 of tokenised pairs, in the order given (see score_pairs).

    With edits and edit_of_pair (one edit index per pair), each pair is scored under the model changed
    by its own edit only (LowRankEdits), all in one pass; pairs of different edits share no slots.
    """
    if not encoded:
        return np.zeros((0,), np.float64)
    if (edits is None) != (edit_of_pair is None):
        raise ValueError("score_encoded takes edits and edit_of_pair together")
    if edits is not None:
        edits.check(cfg)
        if len(edit_of_pair) != len(encoded):
            raise ValueError(f"edit_of_pair has {len(edit_of_pair)} entries for {len(encoded)} pairs")
        unknown = sorted({int(e) for e in edit_of_pair} - set(int(e) for e in edits.column_edit))
        if unknown:
            raise ValueError(f"pairs are to be scored under edits {unknown[:8]}, which have no columns in edits")
    for k, e in enumerate(encoded):  # out-of-range ids would be clamped by JAX, not rejected
        tokenize.check_token_ids(e.prompt_ids + e.target_ids, cfg, f"scored pair {k}")
    # the last target token is only ever predicted, never a predictor: it needs no slot
    seqs = [e.prompt_ids + e.target_ids[:-1] for e in encoded]
    tokenize.check_lengths([len(s) for s in seqs], cfg, "a scored prompt + target (less its last token)")
    width = max(row_width, packing.bucket(max(len(s) for s in seqs), 8))
    rows, paths = pack_token_trees(seqs, width, groups=edit_of_pair)
    scored = collections.defaultdict(list)  # row -> (slot predicting, token, pair)
    for pair, (e, (row, path)) in enumerate(zip(encoded, paths)):
        n_prompt = len(e.prompt_ids)
        scored[row] += [(path[n_prompt + j - 1], tid, pair) for j, tid in enumerate(e.target_ids)]
    total = np.zeros((len(encoded),), np.float64)
    starts = range(0, len(rows), batch_size)
    mesh = mesh_of(params)  # on a mesh, each call's rows go over its data axis
    for start in progress_bar(starts, progress, "scoring"):
        chunk = range(start, min(start + batch_size, len(rows)))
        n_rows = min(batch_size, packing.bucket(len(chunk), 2))  # a few shapes, little padding
        tokens, depths, ends = (np.zeros((n_rows, width), np.int32) for _ in range(3))
        token_group = np.full((n_rows, width), -1, np.int32)
        slots = []
        for k, r in enumerate(chunk):
            n = len(rows[r].tokens)
            tokens[k, :n], depths[k, :n], ends[k, :n] = rows[r].tokens, rows[r].depths, rows[r].ends
            token_group[k, :n] = rows[r].groups
            slots += [(k * width + slot, tid, pair) for slot, tid, pair in scored[r]]
        tok, ids, pair = (np.asarray(x) for x in zip(*slots))
        predictors, which = np.unique(tok, return_inverse=True)
        u, m = packing.bucket(len(predictors), 64), packing.bucket(len(slots), 64)
        pad = lambda a, n: jnp.asarray(np.pad(a, (0, n - len(a))))
        tokens, depths, ends, token_group = rows_over_data(mesh, (tokens, depths, ends, token_group))
        nll = score_tree_rows(params, cfg, jnp.asarray(tokens), jnp.asarray(depths), jnp.asarray(ends),
                              pad(predictors, u), pad(which, m), pad(ids, m),
                              None if edits is None else edits.device_updates(token_group))
        np.add.at(total, pair, np.asarray(to_host(nll), np.float64)[:len(slots)])
    return total / np.asarray([len(e.target_ids) for e in encoded], np.float64)


def score_pairs(params, cfg: LlamaConfig, tokenizer, pairs: Sequence[tuple[str, str]],
                batch_size: int = 16, row_width: int = 64, progress: bool | None = None) -> np.ndarray:
    """Mean per-token NLL of each target teacher-forced after its prompt, in packed jit batches.

    Args:
      pairs: N (prompt_text, target_text) pairs; targets without a leading space.
      batch_size: rows per jit call (a short last call is padded to an even number of rows).
      row_width: tokens per row (widened to the longest sequence); each row packs many sequences.
    Returns:
      (N,) float64 mean target NLL (nats per token), in the order of `pairs`.
    """
    return score_encoded(params, cfg, encode_pairs(tokenizer, pairs), batch_size, row_width, progress)
