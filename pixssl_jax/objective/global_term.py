"""Global consistency [paper]: each view's prediction against the teacher's other view (BYOL)."""

import ml_collections

from pixssl_jax.losses import global_consistency
from pixssl_jax.objective.parts import Term
from pixssl_jax.objective.parts import TermInputs


def _enabled(method_cfg: ml_collections.ConfigDict) -> bool:
  return bool(method_cfg.use_global)


def _compute(inputs: TermInputs):
  b = inputs.views.shape[0] // 2
  pred, target = inputs.student['global_pred'], inputs.teacher['global_proj']
  loss = global_consistency(pred[:b], pred[b:], target[:b], target[b:])
  return [float(inputs.method_cfg.lambda_global) * loss], {'loss_global': loss}


TERM = Term('global', _enabled, _compute, ('loss_global',), needs_teacher=True,
            needs_predictor=True)
