"""ROME, MEMIT and EMMET for Llama-3-family models, as pure functions over a parameter tree.

The named editors live in their modules (jaxedit.rome.rome, jaxedit.memit.memit,
jaxedit.emmet.emmet); `edit` is the core they share.
"""
from .editor import EditReport, edit, edit_values
from .hparams import CovarianceHparams, EditHparams, TemplateHparams, ValueHparams, preset
from .requests import EditRequest
from .schedule import batch_edit, sequential_batched_edit, sequential_edit

__all__ = ["EditReport", "edit", "edit_values", "CovarianceHparams", "EditHparams", "TemplateHparams",
           "ValueHparams", "preset", "EditRequest", "batch_edit", "sequential_batched_edit", "sequential_edit"]
