"""The model, hparams, cases, C0 and templates an experiment program works on, from its flags.

--model=smollm2 (the offline SmolLM2-135M GGUF), a .gguf file or an HF folder, or "tiny-random": a
4-layer random Llama with a word-level hashing tokenizer (jaxedit.testing), for tests of the
programs' plumbing in seconds (its metrics mean nothing).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

from experiments.program import FLAGS, TINY
from jaxedit import testing


def load_model(spec: str, mesh: str | None = None):
    """(cfg, params, tokenizer) for a --model value, the params laid out on a --mesh ("DxM") over all
    processes' devices when given."""
    from experiments.program import parse_mesh

    if spec == TINY:
        cfg, params, tok = testing.tiny_model()
    else:
        from llama3_flax import checkpoint

        cfg, params, tok = checkpoint.load_model(spec)
    shape = parse_mesh(mesh)
    if shape is not None:
        from llama3_flax import sharding

        params = sharding.shard_params(params, cfg, sharding.make_mesh(*shape))
    return cfg, params, tok


def hparams_for(spec: str, method: str, layer: int | None = None, v_steps: int | None = None,
                cov_samples: int | None = None, cov_max_length: int | None = None, *, cfg=None):
    """The preset hparams of a method for the model of a --model value, with optional overrides.

    cfg: the loaded model's config; its preset is jaxedit.hparams.preset_for(cfg, method) (a model
    no preset knows borrows one, with a logged warning naming it). tiny-random needs no cfg: it
    borrows SmolLM2-135M's preset, shrunk (short templates, few C0 samples and steps, layer 1).
    """
    from jaxedit import hparams as H

    if spec == TINY:  # cheap: short templates, few samples, few steps
        logging.info("tiny-random borrows SmolLM2-135M's %s preset, shrunk for speed", method)
        hp = H.preset("smollm2-135m", method)
        hp = hp.replace(templates=H.TemplateHparams(groups=((4, 5),)),
                        covariance=H.CovarianceHparams(n_samples=16, max_length=32),
                        value=dataclasses.replace(hp.value, v_num_grad_steps=4), layers=(1,))
    elif cfg is None:
        raise ValueError(f"hparams_for({spec!r}, {method!r}) needs cfg=, the loaded model's config: the preset "
                         "is chosen from the model's shape")
    else:
        hp = H.preset_for(cfg, method)
    if layer is not None:
        hp = hp.replace(layers=(int(layer),))
    if v_steps is not None:
        hp = hp.replace(value=dataclasses.replace(hp.value, v_num_grad_steps=v_steps))
    if cov_samples is not None or cov_max_length is not None:
        hp = hp.replace(covariance=dataclasses.replace(
            hp.covariance, n_samples=cov_samples or hp.covariance.n_samples,
            max_length=cov_max_length or hp.covariance.max_length))
    return hp


def hparams_from_flags(method: str, layer: int | None = None, *, cfg=None):
    return hparams_for(FLAGS.model, method, layer, FLAGS.v_steps, FLAGS.cov_samples, FLAGS.cov_max_length, cfg=cfg)


def load_cases(source: str, n: int | None = None, seed: int = 0, ids: Sequence | None = None):
    from jaxedit.data.counterfact import load_counterfact

    return load_counterfact(source, ids=ids, n=n, seed=seed)


def covariances(params, cfg, tok, layers: Sequence[int], hp, cache_dir: str | os.PathLike | None,
                corpus: str | None = None, progress: bool = True) -> dict:
    """{layer: C0} for all layers in one corpus pass (cached on disk per layer)."""
    from jaxedit.editing.covariance import preservation_covariance

    spec = hp.covariance if corpus is None else dataclasses.replace(hp.covariance, corpus=str(corpus))
    return preservation_covariance(params, cfg, tok, sorted(set(int(l) for l in layers)), spec,
                                   cache_dir=None if cache_dir is None else Path(cache_dir) / "cov",
                                   progress=progress)


def templates(params, cfg, tok, hp, cache_dir):
    from jaxedit.editing.templates import context_templates

    return context_templates(params, cfg, tok, hp.templates, cache_dir=cache_dir)
