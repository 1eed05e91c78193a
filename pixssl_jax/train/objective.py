"""The pre-training objective: global + uncertainty-weighted pixel consistency.

`pretrain_loss` is what the jitted train step differentiates with respect to the student
params. It is a pure function; `model`, `method_cfg` and `num_steps` are static (bind them with
`functools.partial`). Nothing depends on the batch size, so the same function serves any
global batch and any sharding of it.
"""

import jax
import jax.numpy as jnp
import ml_collections

from pixssl_jax import losses
from pixssl_jax.losses import cosine_discrepancy
from pixssl_jax.losses import effective_rank
from pixssl_jax.losses import global_consistency
from pixssl_jax.losses import l2_normalize
from pixssl_jax.losses import match_features
from pixssl_jax.losses import match_features_by_distance
from pixssl_jax.losses import mc_dropout_statistics
from pixssl_jax.losses import mean_over_samples
from pixssl_jax.losses import ramp_threshold
from pixssl_jax.losses import spearman
from pixssl_jax.losses import uncertainty_calibration
from pixssl_jax.losses import variance_covariance
from pixssl_jax.losses import weight_statistics
from pixssl_jax.losses import WEIGHTING_FORMS
from pixssl_jax.losses import WEIGHTING_SCALES
from pixssl_jax.models.heads import dropout_scale
from pixssl_jax.models.pixssl import PixSSLModel

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


def pixel_maps(params, ema_params, batch: dict[str, jax.Array], key: jax.Array, *,
               model: PixSSLModel, method_cfg: ml_collections.ConfigDict
               ) -> dict[str, jax.Array]:
  """What the logs show of the batch's first pair: its views, overlap and uncertainty.

  Returns:
    `view1`, `view2` `[*P]`; `overlap` (1 where view 1's feature cell has a match in view 2)
    and `uncertainty` `[*G]`, on view 1's feature grid.
  """
  first = jax.tree.map(lambda x: x[:1], batch)
  views = jnp.concatenate([first['view1'], first['view2']], axis=0)
  student = model.apply({'params': params}, views, with_predictor=False)
  teacher = model.apply({'params': ema_params}, views, with_predictor=False)
  _, uncertainty, _, valid = pixel_predictions(
      params, student['pixel_proj'], teacher['pixel_proj'], first, key, model=model,
      method_cfg=method_cfg)
  return {'view1': views[0, ..., 0], 'view2': views[1, ..., 0],
          'overlap': valid[0].astype(jnp.float32), 'uncertainty': uncertainty[0]}


def pretrain_loss(params, ema_params, batch: dict[str, jax.Array], key: jax.Array,
                  step: jax.Array, *, model: PixSSLModel, method_cfg: ml_collections.ConfigDict,
                  num_steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pixel-global SSL loss of one batch.

  Args:
    params: student params pytree (differentiated).
    ema_params: teacher params pytree (EMA of the student; receives no gradient).
    batch: `view1, view2 [B, *P, 1]` float32, `transform1, transform2 [B, n, n+1]` float32.
    key: the step's dropout / MC key (already folded with the step).
    step: current step (scalar, may be traced), drives the 'threshold' ramp.
    model: the `PixSSLModel` (static).
    method_cfg: the `method` ConfigDict (static), configs/pretrain.py's fields.
    num_steps: total training steps (static).

  Returns:
    `(loss, metrics)`: scalar float32 loss and float32 scalars `loss, loss_global,
    loss_pixel, loss_variance, loss_covariance, loss_calibration, uncertainty_mean,
    uncertainty_p90, overlap_fraction, projection_std` and `PIXEL_DIAGNOSTICS` (a disabled
    term's metrics are 0). Uncertainty and weight statistics are over valid (matched) cells.
  """
  use_global, use_pixel = bool(method_cfg.use_global), bool(method_cfg.use_pixel)
  if not (use_global or use_pixel):
    raise ValueError('method.use_global and method.use_pixel are both False: nothing to train')
  if method_cfg.match not in MATCH_MODES:
    raise ValueError(f'method.match must be one of {MATCH_MODES}, got {method_cfg.match!r}')
  if method_cfg.weighting not in WEIGHTING_FORMS:
    raise ValueError(f'method.weighting must be one of {WEIGHTING_FORMS}, '
                     f'got {method_cfg.weighting!r}')
  scale = method_cfg.weighting_scale
  if scale not in WEIGHTING_SCALES:
    raise ValueError(f'method.weighting_scale must be one of {WEIGHTING_SCALES}, '
                     f'got {scale!r}')
  view1, view2 = batch['view1'], batch['view2']
  if view1.shape != view2.shape:
    raise ValueError(f'batch view1 {view1.shape} and view2 {view2.shape} differ in shape')
  b = view1.shape[0]
  zero = jnp.zeros((), jnp.float32)

  # 1. Student forward on both views as one batch [2B, *P, 1]: rows :B are view 1, B: view 2.
  views = jnp.concatenate([view1, view2], axis=0)
  student = model.apply({'params': params}, views, with_predictor=use_global)
  # 2. Teacher forward, same batch; the teacher never runs the predictor or the stabilizer.
  teacher = jax.lax.stop_gradient(
      model.apply({'params': ema_params}, views, with_predictor=False))

  # 3. Global consistency: prediction of each view against the teacher projection of the other.
  loss_global = zero
  if use_global:
    pred, target = student['global_pred'], teacher['global_proj']
    loss_global = global_consistency(pred[:b], pred[b:], target[:b], target[b:])
  # Collapse monitor (SimSiam): per-dimension std over the batch of the unit-normalised student
  # projections; about 1/sqrt(D) when healthy, 0 when every view maps to the same vector.
  projection_std = jnp.mean(jnp.std(
      l2_normalize(jax.lax.stop_gradient(student['global_proj'])), axis=0))

  loss_pixel, loss_calibration, u_mean, u_p90, overlap = zero, zero, zero, zero, zero
  calibrate = calibrates_uncertainty(method_cfg, model)
  loss_variance, loss_covariance = zero, zero
  diagnostics = {name: zero for name in PIXEL_DIAGNOSTICS}
  spread_weights = (float(method_cfg.lambda_variance), float(method_cfg.lambda_covariance))
  if use_pixel:
    # 4-5. Student pixel predictions (and uncertainty), teacher targets of the other view.
    pred_pix, uncertainty, matched, valid = pixel_predictions(
        params, student['pixel_proj'], teacher['pixel_proj'], batch, key, model=model,
        method_cfg=method_cfg)
    discrepancy = cosine_discrepancy(pred_pix, matched)
    loss_pixel, weights = uncertainty_weighting(
        discrepancy, valid, uncertainty, step=step, num_steps=num_steps, method_cfg=method_cfg,
        num_channels=model.pixel_proj_dim)
    if calibrate:
      loss_calibration = uncertainty_calibration(uncertainty, discrepancy, valid)

    u_const = jax.lax.stop_gradient(uncertainty)
    n_valid = jnp.sum(valid)
    overlap = jnp.mean(valid.astype(jnp.float32))
    u_mean = jnp.where(n_valid > 0, jnp.sum(jnp.where(valid, u_const, 0.0))
                       / jnp.maximum(n_valid, 1), 0.0)
    u_p90 = jnp.nan_to_num(jnp.nanpercentile(jnp.where(valid, u_const, jnp.nan), 90.0))
    diagnostics = dict(
        weight_statistics(weights, valid),
        uncertainty_spearman=spearman(u_const, jax.lax.stop_gradient(discrepancy), valid),
        pixel_effective_rank=effective_rank(student['pixel_proj']))

  # Anti-collapse terms on the student's pixel projections (all pixels of both views), in
  # every variant alike: an ablation of the pixel term (`global_only`) changes that one term.
  if spread_weights != (0.0, 0.0):
    loss_variance, loss_covariance = variance_covariance(student['pixel_proj'])

  # 6. Total; a disabled term is absent (not multiplied by zero).
  loss = spread_weights[0] * loss_variance + spread_weights[1] * loss_covariance
  if use_global:
    loss = loss + float(method_cfg.lambda_global) * loss_global
  if use_pixel:
    loss = loss + float(method_cfg.lambda_pixel) * loss_pixel
    if calibrate:
      loss = loss + float(method_cfg.lambda_calibration) * loss_calibration
  metrics = {
      'loss': loss,
      'loss_global': loss_global,
      'loss_pixel': loss_pixel,
      'loss_variance': loss_variance,
      'loss_covariance': loss_covariance,
      'loss_calibration': loss_calibration,
      'uncertainty_mean': u_mean,
      'uncertainty_p90': u_p90,
      'overlap_fraction': overlap,
      'projection_std': projection_std,
      **diagnostics,
  }
  return loss, metrics


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
