"""What a pre-training loss term is: the contract between a term and `pretrain_loss`.

A term is one module of this package defining a `Term`; `registry.TERMS` lists them in the
order their weighted parts are summed. `pretrain_loss` runs the student (and, when an enabled
term needs it, the teacher) once, hands every enabled term the same `TermInputs`, sums the
parts the terms return and merges their metrics; a disabled term's metrics are reported as 0,
so the metrics of every run have the same keys. docs/design.md shows how to add one.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections

from pixssl_jax.models.pixssl import PixSSLModel


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """Everything a term may read; built once per step by `pretrain_loss`.

  Attributes:
    params: student params (differentiated).
    batch: the batch (`view1`, `view2`, `transform1`, `transform2`, optional student masks).
    views: `[2B, *P, 1]` the two views as the teacher sees them (rows :B view 1).
    student: the student's outputs on its (masked) input of both views.
    teacher: the teacher's outputs on `views`, or None when no enabled term needs them.
    key: the step's dropout / MC key.
    step: current step (may be traced).
    model: the module (static).
    method_cfg: the `method` config (static).
    num_steps: total steps (static).
  """
  params: Any
  batch: dict[str, jax.Array]
  views: jax.Array
  student: dict[str, jax.Array]
  teacher: dict[str, jax.Array] | None
  key: jax.Array
  step: jax.Array
  model: PixSSLModel
  method_cfg: ml_collections.ConfigDict
  num_steps: int


class Term(NamedTuple):
  """One pre-training loss term.

  Attributes:
    name: the term's name; its loss is logged as `loss_<name>`.
    enabled: whether the `method` config turns it on (a function of that config alone).
    compute: `TermInputs -> (parts, metrics)`: the weighted scalars it adds to the loss, in
      order, and its metrics (every key of `metric_names`).
    metric_names: the metrics it reports, `loss_<name>` among them.
    needs_teacher: it reads `TermInputs.teacher`.
    needs_predictor: it reads the student's `global_pred`.
    model_heads: `build_model` arguments for heads that exist only while it is on, so runs
      without it keep their parameter tree (and old checkpoints restore).
    optional_losses: `loss_*` metrics of an optional part of the term, each with the test
      of the `method` config that turns the part on; the progress line leaves the others out.
  """
  name: str
  enabled: Callable[[ml_collections.ConfigDict], bool]
  compute: Callable[[TermInputs], tuple[list[jax.Array], dict[str, jax.Array]]]
  metric_names: tuple[str, ...]
  needs_teacher: bool = False
  needs_predictor: bool = False
  model_heads: dict[str, Any] = {}
  optional_losses: dict[str, Callable[[ml_collections.ConfigDict], bool]] = {}

  def losses(self, method_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The `loss_*` metrics this term adds to the loss under `method_cfg`."""
    return tuple(n for n in self.metric_names if n.startswith('loss_')
                 and self.optional_losses.get(n, lambda _: True)(method_cfg))
