"""VICReg's variance and covariance terms on the student's pixel projections.

They apply to all pixels of both views in every variant alike, so an ablation of the pixel
term (`global_only`) changes that one term (docs/method.md: without them the pixel branch
collapses).
"""

import ml_collections

from pixssl_jax.losses import variance_covariance
from pixssl_jax.objective.parts import Term
from pixssl_jax.objective.parts import TermInputs


def _enabled(method_cfg: ml_collections.ConfigDict) -> bool:
  return (float(method_cfg.lambda_variance), float(method_cfg.lambda_covariance)) != (0.0, 0.0)


def _compute(inputs: TermInputs):
  method_cfg = inputs.method_cfg
  variance, covariance = variance_covariance(inputs.student['pixel_proj'])
  parts = [float(method_cfg.lambda_variance) * variance
           + float(method_cfg.lambda_covariance) * covariance]
  return parts, {'loss_variance': variance, 'loss_covariance': covariance}


TERM = Term('spread', _enabled, _compute, ('loss_variance', 'loss_covariance'))
