"""ROME, MEMIT, EMMET and AlphaEdit for Llama-3-family models, as pure functions over a parameter tree.

Where things are:
  jaxedit.editing   the editing core: keys, values, C0, the preservation-memorisation solve, editors,
                    schedules
  jaxedit.eval      scoring, CounterFact metrics, generation entropy, tables
  jaxedit.data      CounterFact, text corpora, data and cache locations
  jaxedit.interop   the PyTorch tools' hparams files, and checkpoints they edited
  jaxedit.tracing   causal tracing of known facts (which hidden states carry them)
  jaxedit.methods   what distinguishes ROME, MEMIT, EMMET and AlphaEdit (one Method each)
  jaxedit.hparams   frozen hparams and per-model presets

The names below are the public API for everyday use.
"""
from jaxedit.data.counterfact import load_counterfact
from jaxedit.editing.covariance import preservation_covariance
from jaxedit.editing.editor import EditReport, alphaedit, edit, edit_values, emmet, memit, rome
from jaxedit.editing.null_space import preservation_null_spaces
from jaxedit.editing.schedule import batch_edit, sequential_batched_edit, sequential_edit
from jaxedit.editing.templates import context_templates
from jaxedit.eval.metrics import evaluate
from jaxedit.eval.tables import format_before_after, format_table
from jaxedit.hparams import CovarianceHparams, EditHparams, TemplateHparams, ValueHparams, preset, preset_for
from jaxedit.methods import ALPHAEDIT, EMMET, MEMIT, METHODS, ROME, Method
from jaxedit.requests import EditRequest

__all__ = ["load_counterfact", "preservation_covariance", "preservation_null_spaces", "EditReport", "alphaedit",
           "edit", "edit_values", "emmet", "memit", "rome", "batch_edit", "sequential_batched_edit", "sequential_edit", "context_templates", "evaluate",
           "format_before_after", "format_table", "CovarianceHparams", "EditHparams", "TemplateHparams",
           "ValueHparams", "preset", "preset_for", "ALPHAEDIT", "EMMET", "MEMIT", "METHODS", "ROME", "Method", "EditRequest"]
