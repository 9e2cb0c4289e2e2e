"""MEMIT as a pure editor: (params, requests) -> (new params, report). See jaxedit.editor for the core."""
from __future__ import annotations

import dataclasses

from .editor import edit
from .hparams import EditHparams


def memit(params, cfg, tokenizer, requests, hparams: EditHparams, *, covariances, templates, **kwargs):
    """Edits with MEMIT, whatever hparams.method says (it is set to "memit")."""
    if hparams.method != "memit":
        hparams = dataclasses.replace(hparams, method="memit")
    return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates, **kwargs)
