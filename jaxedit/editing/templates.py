"""Context templates: "{}" plus short texts sampled from the model, so keys and values generalise
over the contexts a fact may appear in (as the ROME and MEMIT reference implementations make them)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax

from llama3_flax.generate import generate_text

from jaxedit.cache import atomic_write_json, model_fingerprint
from jaxedit.hparams import TemplateHparams
from jaxedit.editing import preflight
from jaxedit.editing.tokenize import encode_prompt

STARTERS = ("The", "Therefore", "Because", "I", "You")


def generate_context_templates(params, cfg, tokenizer, spec: TemplateHparams) -> tuple[tuple[str, ...], ...]:
    """Groups of templates: (("{}",), group for each (length, n) in spec.groups).

    Each sampled template is a `length`-token text (its starter and BOS included) begun from one of
    STARTERS, top-k sampled, braces removed, followed by ". {}". Deterministic given spec.seed.
    """
    groups = [("{}",)]
    rng = jax.random.PRNGKey(spec.seed)
    for length, n in spec.groups:
        if n % len(STARTERS):
            raise ValueError(f"template group size {n} must be a multiple of {len(STARTERS)}")
        texts = []
        for starter in STARTERS:
            rng, sub = jax.random.split(rng)
            new = max(1, length - len(encode_prompt(tokenizer, starter)))
            outs = generate_text(params, cfg, tokenizer, [starter] * (n // len(STARTERS)), max_new_tokens=new,
                                 top_k=spec.top_k, seed=int(jax.random.randint(sub, (), 0, 2**31 - 1)))
            texts += [starter + out for out in outs]
        groups.append(tuple(t.replace("{", " ").replace("}", " ") + ". {}" for t in texts))
    return tuple(groups)


def _cached_groups_problem(path: Path, spec: TemplateHparams) -> str | None:
    """Why the cached groups at `path` are not what `spec` generates (None when they are): the
    editors' checks (preflight.check_template_groups) and one group of n templates per (length, n)."""
    try:
        groups = json.loads(path.read_text())
        preflight.check_template_groups(groups)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON"
    except ValueError as e:
        return f"invalid ({e})"
    sizes = [len(g) for g in groups[1:]]
    if sizes != [n for _, n in spec.groups]:
        return f"of groups of {sizes} templates where the hparams ask for {[n for _, n in spec.groups]}"
    return None


def context_templates(params, cfg, tokenizer, spec: TemplateHparams,
                      cache_dir: str | os.PathLike | None = None) -> tuple[tuple[str, ...], ...]:
    """Context templates, cached per (model fingerprint, spec) as JSON in cache_dir if given."""
    if cache_dir is None:
        return generate_context_templates(params, cfg, tokenizer, spec)
    key = f"{model_fingerprint(params, cfg)}-{'_'.join(f'{l}x{n}' for l, n in spec.groups)}-k{spec.top_k}-s{spec.seed}"
    path = Path(cache_dir) / "templates" / f"{key}.json"
    if path.exists():
        why = _cached_groups_problem(path, spec)
        if why is None:
            return tuple(tuple(g) for g in json.loads(path.read_text()))
        logging.warning("context template cache %s is %s; regenerating", path, why)
    groups = generate_context_templates(params, cfg, tokenizer, spec)
    atomic_write_json(path, [list(g) for g in groups])
    return groups


def flat(groups) -> tuple[str, ...]:
    return tuple(t for g in groups for t in g)
