"""ROME, MEMIT and EMMET for Llama-3-family models, as pure functions over a parameter tree."""
from .editor import EditReport, edit, edit_values
from .emmet import emmet
from .hparams import CovarianceHparams, EditHparams, TemplateHparams, ValueHparams, preset
from .memit import memit
from .requests import EditRequest
from .rome import rome
from .schedule import batch_edit, sequential_batched_edit, sequential_edit

__all__ = ["EditReport", "edit", "edit_values", "emmet", "memit", "rome", "CovarianceHparams", "EditHparams",
           "TemplateHparams", "ValueHparams", "preset", "EditRequest", "batch_edit", "sequential_batched_edit",
           "sequential_edit"]
