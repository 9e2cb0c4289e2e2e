"""Keys: the down_proj input at the subject's last token, averaged over context templates."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from llama3_flax.sharding import mesh_of, rows_over_data
import numpy as np

import functools

import jax

from llama3_flax.model import Capture, embed, run_layers

from jaxedit.requests import EditRequest
from jaxedit.editing.tokenize import check_lengths, encode_prompt, pad_id, pad_right


def fill(template: str, request: EditRequest) -> tuple[str, str]:
    """(text before the subject, full text) of a context template ("... {}") around the request."""
    text = template.replace("{}", request.prompt, 1)
    cut = text.index("{}")
    return text[:cut], text[:cut] + request.subject + text[cut + 2:]


def subject_last_index(tokenizer, prefix: str, request: EditRequest) -> int:
    """Index of the subject's last token in the tokenised text, from tokenising prefix + subject
    (BOS included when the tokenizer adds one), so the index is right for every tokenizer."""
    with_subject = len(encode_prompt(tokenizer, prefix + request.subject))
    # The prefix's trailing space merges into the subject's first token, so compare without it.
    if with_subject <= len(encode_prompt(tokenizer, prefix.rstrip())):
        raise ValueError(f"EditRequest {request.name}: field 'subject' {request.subject!r} tokenises to nothing")
    return with_subject - 1


def subject_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]):
    """Token rows for every (request, template) pair, request-major.

    Returns:
      ids: list of token lists, one per row; last: (rows,) subject-last-token index of each row.
    """
    ids, last = [], []
    for r in requests:
        for t in templates:
            prefix, text = fill(t, r)
            ids.append(encode_prompt(tokenizer, text))
            last.append(subject_last_index(tokenizer, prefix, r))
    return ids, np.asarray(last, np.int32)


def group_average_matrix(n_requests: int, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """(n, n * rows_per_request) weights that average within each template group, then over groups."""
    per_row = np.concatenate([np.full(len(g), 1.0 / (len(g) * len(groups))) for g in groups])
    return np.kron(np.eye(n_requests), per_row[None, :]).astype(np.float32)


def pad_rows(ids, last, pad: int, multiple: int = 8, width: int | None = None):
    """Right-pads rows to `width` (default: a bucketed width) and the row count to a multiple (dummy
    rows fully masked)."""
    n = len(ids)
    rows = -(-n // multiple) * multiple
    tokens, mask = pad_right(list(ids) + [[pad]] * (rows - n), pad, width)
    mask[n:] = 0
    last = np.concatenate([last, np.zeros(rows - n, np.int32)])
    return tokens, mask, last


def _check_rows(ids, cfg, requests: Sequence[EditRequest], per_request: int, what: str) -> None:
    """check_lengths on request-major rows, naming the request of the longest row."""
    if ids:
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        check_lengths([len(ids[longest])], cfg, f"{what} prompt of {requests[longest // per_request].name}")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _capture(params, cfg, tokens, mask, layers, positions):
    """Runs only the layers up to the last captured one (no later layers, no unembedding)."""
    _, captured = run_layers(params, cfg, embed(params, tokens), mask, last_layer=jnp.max(layers),
                             capture=Capture(layers=layers, positions=positions))
    return captured


def keys_at_layers(params, cfg, tokenizer, requests: Sequence[EditRequest], template_groups,
                   layers: Sequence[int]) -> jnp.ndarray:
    """Template-averaged keys (len(layers), n, F) in float32.

    template_groups: (("{}",), (t1, ...), ...). MEMIT/EMMET pass the groups as made (average within
    each group, then across groups); ROME passes one group of all templates (plain average).
    """
    flat = [t for g in template_groups for t in g]
    ids, last = subject_rows(tokenizer, requests, flat)
    _check_rows(ids, cfg, requests, len(flat), "context-template")
    tokens, mask, last = pad_rows(ids, last, pad_id(tokenizer))
    tokens, mask, last = rows_over_data(mesh_of(params), (tokens, mask, last[:, None]))  # rows over a mesh's data axis
    captured = _capture(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(layers, jnp.int32),
                        jnp.asarray(last))
    rows = captured.mlp_in[:, : len(ids), 0].astype(jnp.float32)  # (Lc, rows, F)
    avg = jnp.asarray(group_average_matrix(len(requests), template_groups))
    return jnp.einsum("nr,lrf->lnf", avg, rows)


def outputs_at_subject(params, cfg, tokenizer, requests: Sequence[EditRequest], layer: int):
    """(mlp_out (n, D), resid_out (n, D)) of `layer` at the subject's last token of each bare prompt."""
    ids, last = subject_rows(tokenizer, requests, ["{}"])
    _check_rows(ids, cfg, requests, 1, "bare")
    tokens, mask, last = pad_rows(ids, last, pad_id(tokenizer))
    c = _capture(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray([layer], jnp.int32),
                 jnp.asarray(last[:, None]))
    n = len(requests)
    return c.mlp_out[0, :n, 0].astype(jnp.float32), c.resid_out[0, :n, 0].astype(jnp.float32)
