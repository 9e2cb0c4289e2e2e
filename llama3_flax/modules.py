"""A thin Flax NNX face on the pure model: the parameter pytree held as nnx.Param variables.

The maths stays in math.py / model.py; this module only stores the arrays (names and stacked-layer
shapes of model.py) so that NNX tooling (nnx.jit, nnx.state, nnx.split/merge, optimisers) can be used:

    m = LlamaForCausalLM.from_params(cfg, params)
    logits = m(tokens, mask)           # == model.forward(params, cfg, tokens, mask)
    params = m.params()                # back to the pure pytree
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from . import model
from .config import LlamaConfig
from .model import Params


class LlamaForCausalLM(nnx.Module):
    """Llama decoder whose parameters are nnx.Param variables:

    embed_tokens (V, D), layers: {q_proj: (L, H*E, D), ...} stacked on axis 0, norm (D,), lm_head (V, D)
    (no lm_head when cfg.tie_word_embeddings).
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None = None, *, params: Params | None = None,
                 std: float = 0.02):
        """Random parameters from rngs (as model.init_params), or the given params pytree."""
        if params is None:
            if rngs is None:
                raise ValueError("LlamaForCausalLM needs rngs (random init) or params")
            params = model.init_params(cfg, rngs.params(), std)
        _check_shapes(cfg, params)
        self.cfg = cfg
        self.embed_tokens = nnx.Param(params["embed_tokens"])
        self.layers = nnx.Dict({k: nnx.Param(params["layers"][k]) for k in model.layer_param_names(cfg)})
        self.norm = nnx.Param(params["norm"])
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    @classmethod
    def from_params(cls, cfg: LlamaConfig, params: Params) -> "LlamaForCausalLM":
        return cls(cfg, params=params)

    def params(self) -> Params:
        """The pure parameter pytree of model.py (the arrays themselves, not copies)."""
        out: Params = {"embed_tokens": self.embed_tokens[...],
                       "layers": {k: self.layers[k][...] for k in model.layer_param_names(self.cfg)},
                       "norm": self.norm[...]}
        if not self.cfg.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *,
                 capture: model.Capture | None = None, inject: model.Injection | None = None) -> Any:
        """model.forward on this module's parameters: logits (B, T, V), or (logits, Captured) with capture."""
        return model.forward(self.params(), self.cfg, tokens, mask, capture=capture, inject=inject)


def _check_shapes(cfg: LlamaConfig, params: Params) -> None:
    want = model.param_shapes(cfg)
    got = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
    if jax.tree_util.tree_structure(got, is_leaf=lambda x: isinstance(x, tuple)) != \
            jax.tree_util.tree_structure(want, is_leaf=lambda x: isinstance(x, tuple)) or got != want:
        raise ValueError(f"params do not match the config: shapes {got}, expected {want}")
