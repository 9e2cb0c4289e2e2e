"""ROME as a pure editor: (params, requests) -> (new params, report). See jaxedit.editor for the core."""
from __future__ import annotations

import dataclasses

from .editor import edit
from .hparams import EditHparams


def rome(params, cfg, tokenizer, requests, hparams: EditHparams, *, covariances, templates, **kwargs):
    """Edits with ROME, whatever hparams.method says (it is set to "rome")."""
    if hparams.method != "rome":
        hparams = dataclasses.replace(hparams, method="rome")
    return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates, **kwargs)
