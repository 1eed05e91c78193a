"""Pixel consistency [paper] with the context stabilizer and its uncertainty weighting.

The student's pixel predictions (through the stabilizer's K MC-dropout samples, or its raw
projections when ablated) are compared with the teacher's projections of the other view at
the same source voxels; the per-pixel discrepancy `d` is weighted by the stabilizer's
uncertainty `u` (docs/method.md). With `method.lambda_calibration` the MC-dropout spread is also
trained to rank pixels as `d` does; that part is reported as `loss_calibration`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from pixssl_jax import losses
from pixssl_jax.losses import cosine_discrepancy
from pixssl_jax.losses import effective_rank
from pixssl_jax.losses import match_features
from pixssl_jax.losses import match_features_by_distance
from pixssl_jax.losses import mc_dropout_statistics
from pixssl_jax.losses import mean_over_samples
from pixssl_jax.losses import ramp_threshold
from pixssl_jax.losses import spearman
from pixssl_jax.losses import uncertainty_calibration
from pixssl_jax.losses import weight_statistics
from pixssl_jax.models.heads import dropout_scale
from pixssl_jax.models.pixssl import PixSSLModel
from pixssl_jax.objective.parts import Term
from pixssl_jax.objective.parts import TermInputs

MATCH_MODES = ('inverse', 'distance')
# Diagnostics of the pixel branch in the step's metrics (0 when the pixel term is off):
# how far the weights are from uniform (`weight_cv`, `weight_ess`), the fraction of valid
# pixels with a nonzero weight (`keep_fraction`, below 1 only for 'threshold'), Spearman's
# rank correlation of u and d over valid pixels, the effective rank of the student pixel
# projections.
PIXEL_DIAGNOSTICS = ('weight_cv', 'weight_ess', 'keep_fraction', 'uncertainty_spearman',
                     'pixel_effective_rank')


def has_mc_dropout(model: PixSSLModel, mc_samples: int) -> bool:
  """Whether the stabilizer's K samples differ, so that there is an uncertainty at all."""
  return mc_samples > 1 and model.stabilizer_dropout > 0


def stabilized_prediction(params, pixel_proj: jnp.ndarray, key: jax.Array, *,
                           model: PixSSLModel, mc_samples: int,
                           uncertainty_gradient: str = 'none'
                           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Runs the stabilizer K times with independent dropout keys; returns (mean, uncertainty).

  The K samples share everything before the dropout, so the hidden layer is computed once and
  only the dropout masks are drawn per key, as one vmap over the K keys. The last layer is
  affine, so the mean of the K outputs equals the last layer applied to the mean of the K
  dropped hidden layers: the prediction (and its gradient) costs one pass, not K. The K outputs
  themselves are needed only for the uncertainty; they get a backward pass only when a loss
  differentiates through it (`uncertainty_gradient`).

  Args:
    params: student params.
    pixel_proj: `[N, *G, Cp]` student pixel projections.
    key: dropout key; sample k uses `split(key, K)[k]`.
    model: the module (static).
    mc_samples: K.
    uncertainty_gradient: where gradients of the uncertainty flow: 'none'; 'stabilizer' (its
      parameters only, not the backbone: the calibration term); 'all' (`kendall`).

  Returns:
    `(mean [N, *G, Cp], uncertainty [N, *G])`; the uncertainty is 0 without MC dropout.
  """
  variables = {'params': params}
  if not has_mc_dropout(model, mc_samples):
    # Without MC dropout the stabilizer is a deterministic predictor and nothing is uncertain.
    pred = model.apply(variables, pixel_proj, True, method=PixSSLModel.stabilize)
    return pred, jnp.zeros(pred.shape[:-1], jnp.float32)

  hidden = model.apply(variables, pixel_proj, method=PixSSLModel.stabilizer_hidden_layer)
  # One dropout multiplier per key [K, N, *G, H], drawn as one vmap over the K keys.
  scales = jax.vmap(lambda k: dropout_scale(hidden.shape, model.stabilizer_dropout, k))(
      jax.random.split(key, mc_samples)).astype(hidden.dtype)
  # Averaging the masks, not the dropped activations, keeps the K axis out of the backward
  # pass (XLA's CPU reductions over a leading axis are slow; see `mean_over_samples`).
  mean = model.apply(variables, hidden * mean_over_samples(scales),
                     method=PixSSLModel.stabilizer_output)
  if uncertainty_gradient == 'stabilizer':
    # The same hidden layer, recomputed from a constant input: the uncertainty's gradient
    # reaches the stabilizer's weights but not the features the backbone learns.
    hidden = model.apply(variables, jax.lax.stop_gradient(pixel_proj),
                         method=PixSSLModel.stabilizer_hidden_layer)
  elif uncertainty_gradient == 'none':
    hidden = jax.lax.stop_gradient(hidden)
  samples = model.apply(variables, hidden[None] * scales, method=PixSSLModel.stabilizer_output)
  if uncertainty_gradient == 'none':
    samples = jax.lax.stop_gradient(samples)
  _, uncertainty = mc_dropout_statistics(samples)
  return mean, uncertainty


def calibrates_uncertainty(method_cfg: ml_collections.ConfigDict, model: PixSSLModel) -> bool:
  """Whether the calibration term is on: it needs a weight and an MC-dropout uncertainty."""
  return (float(method_cfg.lambda_calibration) > 0 and bool(method_cfg.use_pixel)
          and bool(method_cfg.use_stabilizer)
          and has_mc_dropout(model, int(method_cfg.mc_samples)))


def uncertainty_gradient(method_cfg: ml_collections.ConfigDict, model: PixSSLModel) -> str:
  """Which gradients of `u` the configured losses need (`stabilized_prediction`)."""
  if method_cfg.weighting == 'kendall':
    return 'all'
  return 'stabilizer' if calibrates_uncertainty(method_cfg, model) else 'none'


def pixel_predictions(params, student_pix: jnp.ndarray, teacher_pix: jnp.ndarray,
                       batch: dict[str, jax.Array], key: jax.Array, *, model: PixSSLModel,
                       method_cfg: ml_collections.ConfigDict):
  """Student pixel predictions with their uncertainty, and the matched teacher targets.

  Args:
    params: student params.
    student_pix, teacher_pix: `[2B, *G, Cp]` pixel projections of (view 1; view 2).
    batch: the batch (for its transforms).
    key: dropout key of the MC samples.
    model: the module (static).
    method_cfg: the `method` config (static).

  Returns:
    `(prediction [2B, *G, Cp], uncertainty [2B, *G], matched [2B, *G, Cp], valid [2B, *G])`.
  """
  b = student_pix.shape[0] // 2
  # 4. The stabilizer's MC mean and its uncertainty, or the raw projection when ablated.
  if method_cfg.use_stabilizer:
    pred_pix, uncertainty = stabilized_prediction(
        params, student_pix, key, model=model, mc_samples=int(method_cfg.mc_samples),
        uncertainty_gradient=uncertainty_gradient(method_cfg, model))
  else:
    pred_pix = student_pix
    uncertainty = jnp.zeros(student_pix.shape[:-1], jnp.float32)
  # 5. Teacher features of the other view, both directions in one call: student cells of
  #    view 1 read teacher view 2 (T1 -> T2^-1) and vice versa.
  t1, t2 = batch['transform1'], batch['transform2']
  other = jnp.concatenate([teacher_pix[b:], teacher_pix[:b]], axis=0)
  t_src = jnp.concatenate([t1, t2], axis=0)
  t_dst = jnp.concatenate([t2, t1], axis=0)
  if method_cfg.match == 'inverse':
    matched, valid = match_features(other, t_src, t_dst, model.pixel_stride)
  else:
    matched, valid = match_features_by_distance(
        other, t_src, t_dst, model.pixel_stride, threshold=float(method_cfg.match_distance))
  return pred_pix, uncertainty, matched, valid


def uncertainty_weighting(discrepancy: jnp.ndarray, valid: jnp.ndarray,
                          uncertainty: jnp.ndarray, *, step: jax.Array, num_steps: int,
                          method_cfg: ml_collections.ConfigDict, num_channels: int
                          ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`losses.uncertainty_weighting` with the parameters of the `method` config.

  Args:
    discrepancy, valid, uncertainty: `[2B, *G]` per-pixel `d`, mask and `u`.
    step: current step (may be traced); drives the 'threshold' ramps.
    num_steps: total training steps (static).
    method_cfg: the `method` config (static).
    num_channels: the stabilizer's output width `Cp` (static).

  Returns:
    `(loss, weights [2B, *G])` as `losses.uncertainty_weighting`.
  """
  scale = method_cfg.weighting_scale
  relative = scale == 'relative'
  tau = method_cfg.tau if relative else method_cfg.tau_absolute
  threshold = ramp_threshold(step, num_steps, float(method_cfg.threshold_start),
                             float(method_cfg.threshold_end))
  keep_fraction = (ramp_threshold(step, num_steps, float(method_cfg.threshold_keep_start),
                                  float(method_cfg.threshold_keep_end))
                   if relative and method_cfg.weighting == 'threshold' else 1.0)
  return losses.uncertainty_weighting(
      discrepancy, valid, uncertainty, form=method_cfg.weighting, scale=scale, tau=float(tau),
      eps=float(method_cfg.kendall_eps), threshold=threshold, keep_fraction=keep_fraction,
      num_channels=num_channels)


def _enabled(method_cfg: ml_collections.ConfigDict) -> bool:
  return bool(method_cfg.use_pixel)


def _compute(inputs: TermInputs):
  method_cfg, model = inputs.method_cfg, inputs.model
  # 4-5. Student pixel predictions (and uncertainty), teacher targets of the other view.
  pred_pix, uncertainty, matched, valid = pixel_predictions(
      inputs.params, inputs.student['pixel_proj'], inputs.teacher['pixel_proj'], inputs.batch,
      inputs.key, model=model, method_cfg=method_cfg)
  discrepancy = cosine_discrepancy(pred_pix, matched)
  loss_pixel, weights = uncertainty_weighting(
      discrepancy, valid, uncertainty, step=inputs.step, num_steps=inputs.num_steps,
      method_cfg=method_cfg, num_channels=model.pixel_proj_dim)
  parts = [float(method_cfg.lambda_pixel) * loss_pixel]
  loss_calibration = jnp.zeros((), jnp.float32)
  if calibrates_uncertainty(method_cfg, model):
    loss_calibration = uncertainty_calibration(uncertainty, discrepancy, valid)
    parts.append(float(method_cfg.lambda_calibration) * loss_calibration)

  u_const = jax.lax.stop_gradient(uncertainty)
  n_valid = jnp.sum(valid)
  metrics = dict(
      loss_pixel=loss_pixel,
      loss_calibration=loss_calibration,
      uncertainty_mean=jnp.where(n_valid > 0, jnp.sum(jnp.where(valid, u_const, 0.0))
                                 / jnp.maximum(n_valid, 1), 0.0),
      uncertainty_p90=jnp.nan_to_num(
          jnp.nanpercentile(jnp.where(valid, u_const, jnp.nan), 90.0)),
      overlap_fraction=jnp.mean(valid.astype(jnp.float32)),
      **weight_statistics(weights, valid),
      uncertainty_spearman=spearman(u_const, jax.lax.stop_gradient(discrepancy), valid),
      pixel_effective_rank=effective_rank(inputs.student['pixel_proj']))
  return parts, metrics


TERM = Term('pixel', _enabled, _compute,
            ('loss_pixel', 'loss_calibration', 'uncertainty_mean', 'uncertainty_p90',
             'overlap_fraction') + PIXEL_DIAGNOSTICS, needs_teacher=True,
            optional_losses={'loss_calibration': lambda m: float(m.lambda_calibration) > 0})
