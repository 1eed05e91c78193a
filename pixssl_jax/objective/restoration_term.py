"""Masked-image restoration: reconstruct the hidden cells of each view from the decoder.

The reference pre-training objective (as MAE, or Models Genesis' in-painting, on the same
U-Net): the student sees each view with a share of its cubes hidden (`data.mask_ratio`,
`data.mask_patch`: the masks the pipeline draws beside the views), a 1x1 head on the finest
decoder level predicts every voxel's intensity, and the loss is the mean L2 (or L1) error over
the hidden voxels against the view before masking. No teacher, no views matched: it measures
what a plain dense pretext task buys on the same store and network.
"""

import jax.numpy as jnp
import ml_collections

from pixssl_jax.objective.parts import Term
from pixssl_jax.objective.parts import TermInputs

RESTORATION_LOSSES = ('l2', 'l1')


def _enabled(method_cfg: ml_collections.ConfigDict) -> bool:
  return float(method_cfg.lambda_restoration) > 0


def restoration_error(reconstruction: jnp.ndarray, target: jnp.ndarray,
                      hidden: jnp.ndarray | None, kind: str) -> jnp.ndarray:
  """Mean error over the hidden voxels (all voxels when `hidden` is None).

  Args:
    reconstruction, target: `[N, *P, 1]` float32.
    hidden: `[N, *P, 1]` bool, True where the student's input was masked; or None.
    kind: 'l2' (squared error) or 'l1' (absolute error).

  Returns:
    float32 scalar; 0 when nothing is hidden.
  """
  error = reconstruction - target
  error = jnp.square(error) if kind == 'l2' else jnp.abs(error)
  if hidden is None:
    return jnp.mean(error)
  weight = hidden.astype(jnp.float32)
  return jnp.sum(error * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _compute(inputs: TermInputs):
  batch = inputs.batch
  hidden = (jnp.concatenate([batch['student_mask1'], batch['student_mask2']], axis=0)
            if 'student_mask1' in batch else None)
  loss = restoration_error(inputs.student['restoration'], inputs.views, hidden,
                           str(inputs.method_cfg.restoration_loss))
  return [float(inputs.method_cfg.lambda_restoration) * loss], {'loss_restoration': loss}


TERM = Term('restoration', _enabled, _compute, ('loss_restoration',),
            model_heads={'restoration_head': True})
