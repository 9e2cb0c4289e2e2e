"""EMMET as a pure editor: (params, requests) -> (new params, report). See jaxedit.editor for the core."""
from __future__ import annotations

import dataclasses

from .editor import edit
from .hparams import EditHparams


def emmet(params, cfg, tokenizer, requests, hparams: EditHparams, *, covariances, templates, **kwargs):
    """Edits with EMMET, whatever hparams.method says (it is set to "emmet")."""
    if hparams.method != "emmet":
        hparams = dataclasses.replace(hparams, method="emmet")
    return edit(params, cfg, tokenizer, requests, hparams, covariances=covariances, templates=templates, **kwargs)
