"""What distinguishes ROME, MEMIT, EMMET and AlphaEdit, in one frozen description per method.

Every place that behaves differently per method asks its `Method` (`method("memit").site`, ...)
instead of comparing names; a new method is one more entry in METHODS.
"""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Method:
    """One editing method, as the shared editing core sees it.

    Attributes:
      name: "rome" | "memit" | "emmet" (what EditHparams.method holds).
      title: the printed name ("ROME").
      site: where the target value is read and written: "mlp" (the edited layer's MLP output, ROME)
        or "resid" (the residual stream after the last edited layer, MEMIT and EMMET).
      grouped_templates: average keys within each context-template group, then across groups
        (MEMIT, EMMET); False: one plain average over all templates (ROME).
      max_layers: how many layers one edit may spread over (None: any number).
      max_requests: how many requests one update takes (None: a batch of any size).
      ridge_rule: the ridge of the n x n system ridge I + K^T C0^-1 K (see `ridge`):
        "zero" (equality constraints), "lambda" (MEMIT's least squares with weight lambda on
        preservation) or "lambda_times_emmet_lambda_for_batches" (EMMET's stabilising ridge,
        none for a single edit).
      template_groups: the reference implementations' context templates, as (tokens, count) groups
        after the bare "{}" (ROME: 10 of 5 tokens and 10 of 10; MEMIT, EMMET, AlphaEdit: 5 of 10).
      update: "preservation" (the preservation-memorisation solve on C0 with the ridge above) or
        "null_space" (AlphaEdit: least squares restricted to C0's null space, jaxedit.editing.pm).
      keeps_previous_keys: sequential schedules hand each batch the keys written by earlier batches,
        which the update keeps in place (AlphaEdit's K_p).
    """

    name: str
    title: str
    site: Literal["mlp", "resid"]
    grouped_templates: bool
    max_layers: int | None
    max_requests: int | None
    ridge_rule: Literal["zero", "lambda", "lambda_times_emmet_lambda_for_batches"]
    template_groups: tuple[tuple[int, int], ...]
    update: Literal["preservation", "null_space"] = "preservation"
    keeps_previous_keys: bool = False

    @property
    def uses_preservation_weight(self) -> bool:
        """Whether lambda (mom2_update_weight) changes the update (ROME's rank-one update does not
        depend on C0's scale)."""
        return self.ridge_rule != "zero" and self.update == "preservation"

    @property
    def uses_emmet_lambda(self) -> bool:
        return self.ridge_rule == "lambda_times_emmet_lambda_for_batches"

    @property
    def uses_null_space(self) -> bool:
        """Whether the update needs C0's null space (nullspace_threshold and l2) instead of its factor."""
        return self.update == "null_space"

    def ridge(self, mom2_update_weight: float, emmet_lambda: float, n_requests: int) -> float:
        """The ridge of the preservation-memorisation solve on the unscaled C0 (jaxedit.editing.pm)."""
        if self.ridge_rule == "zero":
            return 0.0
        if self.ridge_rule == "lambda":
            return float(mom2_update_weight)
        return 0.0 if n_requests == 1 else float(mom2_update_weight) * float(emmet_lambda)

    def check_layers(self, layers) -> None:
        if self.max_layers is not None and len(layers) > self.max_layers:
            count = "one layer" if self.max_layers == 1 else f"at most {self.max_layers} layers"
            raise ValueError(f"{self.name} edits {count}, got layers={tuple(layers)}")

    def check_requests(self, n_requests: int) -> None:
        if self.max_requests is not None and n_requests > self.max_requests:
            count = "one fact" if self.max_requests == 1 else f"at most {self.max_requests} facts"
            raise ValueError(f"{self.title} edits {count} at a time: use batch_size={self.max_requests} "
                             f"(sequential editing), or MEMIT or EMMET for batches; got {n_requests} requests")


ROME = Method(name="rome", title="ROME", site="mlp", grouped_templates=False, max_layers=1, max_requests=1,
              ridge_rule="zero", template_groups=((5, 10), (10, 10)))
MEMIT = Method(name="memit", title="MEMIT", site="resid", grouped_templates=True, max_layers=None,
               max_requests=None, ridge_rule="lambda", template_groups=((10, 5),))
# EMMET spreads a batch over several layers as MEMIT does (its reference code, emmet/emmet_main.py,
# loops over hparams.layers writing residual / remaining layers); its presets edit one layer.
EMMET = Method(name="emmet", title="EMMET", site="resid", grouped_templates=True, max_layers=None,
               max_requests=None, ridge_rule="lambda_times_emmet_lambda_for_batches",
               template_groups=((10, 5),))
# AlphaEdit (Fang et al. 2025): MEMIT's keys, values and layer spreading, the update projected onto
# C0's null space, earlier edits' keys kept (jianghoucheng/AlphaEdit, AlphaEdit_main.py).
ALPHAEDIT = Method(name="alphaedit", title="AlphaEdit", site="resid", grouped_templates=True, max_layers=None,
                   max_requests=None, ridge_rule="zero", template_groups=((10, 5),), update="null_space",
                   keeps_previous_keys=True)

METHODS = {m.name: m for m in (ROME, MEMIT, EMMET, ALPHAEDIT)}


def method(name: str | Method) -> Method:
    """The Method called `name` ("rome", "memit", "emmet", "alphaedit"; case-insensitive); a Method
    passes through."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise ValueError(f"unknown editing method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name.lower()]
