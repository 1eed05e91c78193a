"""Tests of the pre-training objective: ablation switches, MC dropout, gradients, jit."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax import losses
from pixssl_jax import objective
from pixssl_jax.models.heads import dropout_scale
from pixssl_jax.models.pixssl import build_model, init_params, PixSSLModel
from pixssl_jax.rundir import config_upgrade
from pixssl_jax.objective import stabilized_prediction
from pixssl_jax.objective import pretrain_loss

TINY = dict(features=(8, 16, 32), num_groups=4, dtype='float32', proj_hidden=32, proj_dim=16,
            pixel_level=2, pixel_hypercolumn=True, pixel_proj_dim=16, stabilizer_hidden=32,
            stabilizer_dropout=0.2, head_norm='batch', pixel_norm='group', layers='auto')
PATCH = 16  # pixel grid 4x4 at stride 4
DIAGNOSTICS = {'weight_cv', 'weight_ess', 'keep_fraction', 'uncertainty_spearman',
               'pixel_effective_rank'}
METRICS = {'loss', 'loss_global', 'loss_pixel', 'loss_variance', 'loss_covariance',
           'loss_calibration', 'uncertainty_mean', 'uncertainty_p90', 'overlap_fraction',
           'loss_restoration', 'projection_std'} | DIAGNOSTICS


def _transform(offset, flip0=False):
  a = np.eye(2)
  b = np.asarray(offset, np.float64)
  if flip0:
    a[0, 0] = -1.0
    b[0] += PATCH - 1
  return np.concatenate([a, b[:, None]], 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _setup(dropout=0.2):
  model = build_model(ml_collections.ConfigDict(dict(TINY, stabilizer_dropout=dropout)), ndim=2)
  # rbg keys: jit-compiling init with threefry keys costs seconds per compile on CPU.
  init = jax.jit(lambda k: init_params(model, k, (1, PATCH, PATCH, 1)))
  params = init(jax.random.key(0, impl='rbg'))
  ema_params = init(jax.random.key(1, impl='rbg'))
  rng = np.random.default_rng(0)
  batch = {
      'view1': jnp.asarray(rng.random((2, PATCH, PATCH, 1)), jnp.float32),
      'view2': jnp.asarray(rng.random((2, PATCH, PATCH, 1)), jnp.float32),
      'transform1': jnp.asarray(np.stack([_transform((0, 0)), _transform((0, 0))])),
      # Sample 0 shifted by (1, 2) cells; sample 1 by (0, 1) cell and flipped.
      'transform2': jnp.asarray(np.stack([_transform((4, 8)), _transform((0, 4), True)])),
  }
  return model, params, ema_params, batch


def _cfg(**overrides):
  cfg = config_files.load('pretrain', 'demo').method
  cfg.lambda_global, cfg.lambda_pixel, cfg.mc_samples = 2.0, 0.5, 4
  cfg.update(overrides)
  return cfg


def _loss(cfg, dropout=0.2, step=0):
  """Eager loss: after the first call the per-op compile cache makes each config cheap,
  where a jit would compile every config afresh."""
  model, params, ema, batch = _setup(dropout)
  return pretrain_loss(params, ema, batch, jax.random.key(3), step, model=model,
                       method_cfg=cfg, num_steps=10)


@pytest.fixture(scope='module')
def full():
  return _loss(_cfg())


def test_full_loss_and_metrics(full):
  loss, metrics = full
  assert set(metrics) == METRICS
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(loss) == pytest.approx(
      2.0 * float(metrics['loss_global']) + 0.5 * float(metrics['loss_pixel'])
      + 1.0 * float(metrics['loss_variance']) + 0.04 * float(metrics['loss_covariance'])
      + 1.0 * float(metrics['loss_calibration']), rel=1e-6)
  # Overlaps 3/4 * 2/4 and 4/4 * 3/4 cells, the same in both directions.
  assert float(metrics['overlap_fraction']) == pytest.approx((0.375 + 0.75) / 2)
  assert 0 < float(metrics['uncertainty_mean']) <= float(metrics['uncertainty_p90']) < 1 / 16
  # Unit vectors: the mean per-dimension std is at most sqrt(1 / D) (D = 16), 0 on collapse.
  assert 0 < float(metrics['projection_std']) <= 0.25
  # Freshly initialised 1x1 projections have channel stds below VICReg's target of 1.
  assert 0 < float(metrics['loss_variance']) < 1 and float(metrics['loss_covariance']) > 0


def test_each_ablation_switch_removes_exactly_its_term(full):
  _, m = full
  loss_p, mp = _loss(_cfg(use_global=False))
  assert float(loss_p) == pytest.approx(
      0.5 * float(m['loss_pixel']) + float(m['loss_variance']) + 0.04 * float(m['loss_covariance'])
      + float(m['loss_calibration']), rel=1e-6)
  assert float(mp['loss_global']) == 0.0
  loss_g, mg = _loss(_cfg(use_pixel=False))
  # The anti-collapse terms stay: global_only differs from the full method in one term.
  assert float(loss_g) == pytest.approx(
      2.0 * float(m['loss_global']) + float(m['loss_variance'])
      + 0.04 * float(m['loss_covariance']), rel=1e-6)
  assert float(mg['loss_pixel']) == 0.0 and float(mg['overlap_fraction']) == 0.0
  assert float(mg['loss_calibration']) == 0.0
  assert float(mg['loss_variance']) == float(m['loss_variance'])
  assert float(mg['loss_covariance']) == float(m['loss_covariance'])
  assert all(float(mg[name]) == 0.0 for name in DIAGNOSTICS)
  loss_s, ms = _loss(_cfg(lambda_variance=0.0, lambda_covariance=0.0))
  assert float(loss_s) == pytest.approx(
      2.0 * float(m['loss_global']) + 0.5 * float(m['loss_pixel'])
      + float(m['loss_calibration']), rel=1e-6)
  assert float(ms['loss_variance']) == 0.0 and float(ms['loss_covariance']) == 0.0
  with pytest.raises(ValueError, match='nothing to learn'):
    _loss(_cfg(use_global=False, use_pixel=False))


def _added_losses(cfg):
  return [name for term in objective.enabled_terms(cfg) for name in term.losses(cfg)]


def test_the_losses_each_config_adds():
  # The progress line shows these: the calibration part only when its weight is on.
  assert _added_losses(_cfg(lambda_calibration=0.0)) == [
      'loss_variance', 'loss_covariance', 'loss_global', 'loss_pixel']
  assert _added_losses(_cfg(lambda_calibration=1.0))[-1] == 'loss_calibration'
  assert _added_losses(_cfg(use_global=False, use_pixel=False, lambda_variance=0.0,
                            lambda_covariance=0.0, lambda_restoration=1.0)) == [
                                'loss_restoration']


def test_without_stabilizer_the_projection_is_compared_directly():
  model, params, ema, batch = _setup()
  _, m = _loss(_cfg(use_global=False, use_stabilizer=False))
  views = jnp.concatenate([batch['view1'], batch['view2']])
  student = model.apply({'params': params}, views)['pixel_proj']
  teacher = model.apply({'params': ema}, views)['pixel_proj']
  matched, valid = losses.match_features(
      jnp.concatenate([teacher[2:], teacher[:2]]),
      jnp.concatenate([batch['transform1'], batch['transform2']]),
      jnp.concatenate([batch['transform2'], batch['transform1']]), stride=4)
  d = np.asarray(losses.cosine_discrepancy(student, matched))
  assert float(m['loss_pixel']) == pytest.approx(d[np.asarray(valid)].mean(), rel=1e-5)
  assert float(m['uncertainty_mean']) == 0.0


def test_mc_dropout_uncertainty():
  _, with_mc = _loss(_cfg())
  _, one_sample = _loss(_cfg(mc_samples=1))
  assert float(with_mc['uncertainty_mean']) > 0
  assert float(one_sample['uncertainty_mean']) == 0.0
  # Dropout rate 0: K samples are identical, the variance is 0, 'exp' weighting = plain mean.
  _, exp_rate0 = _loss(_cfg(weighting='exp'), dropout=0.0)
  _, none_rate0 = _loss(_cfg(weighting='none'), dropout=0.0)
  assert float(exp_rate0['uncertainty_mean']) == 0.0
  assert float(exp_rate0['loss_pixel']) == pytest.approx(float(none_rate0['loss_pixel']),
                                                         rel=1e-6)
  # ... while with dropout the weighting changes the loss.
  _, none_mc = _loss(_cfg(weighting='none'))
  assert float(none_mc['loss_pixel']) != float(with_mc['loss_pixel'])


def test_gradients_reach_the_student_only():
  model, params, ema, batch = _setup()
  f = functools.partial(pretrain_loss, batch=batch, key=jax.random.key(3), step=0,
                        model=model, method_cfg=_cfg(), num_steps=10)
  g_student, g_teacher = jax.jit(jax.grad(lambda p, e: f(p, e)[0], argnums=(0, 1)))(params, ema)
  for leaf in jax.tree_util.tree_leaves(g_teacher):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  for name in ('backbone', 'projector', 'predictor', 'pixel_projector', 'stabilizer'):
    norms = [float(jnp.linalg.norm(x)) for x in jax.tree_util.tree_leaves(g_student[name])]
    assert all(np.isfinite(norms)) and sum(norms) > 0, name


def test_calibration_trains_the_stabilizer_only():
  model, params, ema, batch = _setup()
  calibration = lambda p: pretrain_loss(
      p, ema, batch, jax.random.key(3), 0, model=model, method_cfg=_cfg(lambda_calibration=1.0),
      num_steps=10)[1]['loss_calibration']
  grads = jax.grad(calibration)(params)
  # The term's gradient reaches the stabilizer, and nothing the backbone or projectors learn.
  for name in ('backbone', 'projector', 'predictor', 'pixel_projector'):
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads[name])), name
  assert sum(float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads['stabilizer'])
             ) > 1e-4
  loss, m = _loss(_cfg(lambda_calibration=0.5))
  _, plain_m = _loss(_cfg(lambda_calibration=0.0))
  assert 0.0 < float(m['loss_calibration']) < 2.0 and float(plain_m['loss_calibration']) == 0.0
  assert float(loss) == pytest.approx(float(plain_m['loss'])
                                      + 0.5 * float(m['loss_calibration']), rel=1e-6)
  # Without an MC-dropout uncertainty there is nothing to calibrate: the term is absent.
  _, one_sample = _loss(_cfg(lambda_calibration=1.0, mc_samples=1))
  assert float(one_sample['loss_calibration']) == 0.0


@pytest.mark.parametrize('overrides', [
    dict(weighting='kendall'),
    dict(weighting='kendall', weighting_scale='absolute'),
    dict(weighting='threshold'),
    dict(weighting='threshold', weighting_scale='absolute', threshold_start=0.0,
         threshold_end=1.0),
    dict(weighting='exp', weighting_scale='absolute'),
    dict(match='distance'),
])
def test_other_forms_run(full, overrides):
  loss, m = _loss(_cfg(**overrides), step=5)
  assert np.isfinite(float(loss))
  if overrides.get('match') == 'distance':  # whole-cell shifts: the same cells match
    assert float(m['overlap_fraction']) == pytest.approx(float(full[1]['overlap_fraction']))


def test_threshold_ramp_selects_pixels():
  """A threshold of 0 keeps no pixel (loss 0); one above every u keeps them all."""
  _, none = _loss(_cfg(weighting='none'))
  absolute = dict(weighting='threshold', weighting_scale='absolute')
  _, closed = _loss(_cfg(threshold_start=0.0, threshold_end=0.0, **absolute))
  _, open_ = _loss(_cfg(threshold_start=1.0, threshold_end=1.0, **absolute))
  assert float(closed['loss_pixel']) == 0.0 and float(closed['keep_fraction']) == 0.0
  assert float(open_['loss_pixel']) == pytest.approx(float(none['loss_pixel']), rel=1e-6)
  assert float(open_['keep_fraction']) == 1.0


def test_relative_threshold_keeps_the_ramped_fraction():
  """Valid cells: 2 x (6 + 12) = 36; keep fraction ramps 0.25 -> 0.75 over 10 steps."""
  cfg = _cfg(weighting='threshold', threshold_keep_start=0.25, threshold_keep_end=0.75)
  _, start = _loss(cfg, step=0)
  _, end = _loss(cfg, step=10)
  first = 0.25 + 0.5 * np.exp(-5.0)
  assert float(start['keep_fraction']) == pytest.approx(np.floor(first * 36 + 0.5) / 36)
  assert float(end['keep_fraction']) == pytest.approx(27 / 36)
  assert float(end['weight_ess']) == pytest.approx(27 / 36, rel=1e-6)


def test_diagnostics_of_the_step():
  _, m = _loss(_cfg())
  # Relative 'exp' weights: far from uniform, every valid cell kept.
  assert float(m['weight_cv']) > 0.3 and 0 < float(m['weight_ess']) < 0.9
  assert float(m['keep_fraction']) == 1.0
  assert -1.0 <= float(m['uncertainty_spearman']) <= 1.0
  assert 1.0 < float(m['pixel_effective_rank']) <= 16.0
  # Uniform weights: cv 0, effective sample fraction 1.
  _, plain = _loss(_cfg(weighting='none'))
  assert float(plain['weight_cv']) == pytest.approx(0.0, abs=1e-6)
  assert float(plain['weight_ess']) == pytest.approx(1.0)
  assert float(plain['pixel_effective_rank']) == pytest.approx(float(m['pixel_effective_rank']))
  # Without MC dropout u = 0: uniform weights and no rank correlation.
  _, one = _loss(_cfg(mc_samples=1))
  assert float(one['weight_ess']) == pytest.approx(1.0)
  assert float(one['uncertainty_spearman']) == 0.0


def test_method_configs_without_scale_fields_keep_the_absolute_forms():
  """A config written before `weighting_scale` existed: absolute 'exp' with its `tau`."""
  old = config_files.load('pretrain', 'demo')
  old.method = _cfg(tau=2e-3)
  del old.method['weighting_scale'], old.method['tau_absolute']
  loss_old, _ = _loss(config_upgrade.upgrade(old).method)
  loss_abs, _ = _loss(_cfg(weighting_scale='absolute', tau_absolute=2e-3))
  assert float(loss_old) == pytest.approx(float(loss_abs), rel=1e-6)


@pytest.mark.parametrize('hypercolumn', [True, False])
def test_hypercolumn_trains_every_decoder_level(hypercolumn):
  """With the hypercolumn the pixel loss reaches decoder levels 0, 1, 2 (and up-convs)."""
  fields = dict(TINY, features=(8, 16, 32, 64), pixel_hypercolumn=hypercolumn)
  model = build_model(ml_collections.ConfigDict(fields), ndim=2)
  _, _, _, batch = _setup()
  init = jax.jit(lambda k: init_params(model, k, (1, PATCH, PATCH, 1)))
  params, ema = init(jax.random.key(0, impl='rbg')), init(jax.random.key(1, impl='rbg'))
  f = functools.partial(pretrain_loss, batch=batch, key=jax.random.key(3), step=0, model=model,
                        method_cfg=_cfg(use_global=False), num_steps=10)
  grads = jax.jit(jax.grad(lambda p: f(p, ema)[0]))(params)['backbone']
  for name in ('dec0', 'dec1', 'dec2', 'up0', 'up1', 'up2'):
    norm = sum(float(jnp.linalg.norm(x)) for x in jax.tree_util.tree_leaves(grads[name]))
    if hypercolumn or name in ('dec2', 'up2'):
      assert np.isfinite(norm) and norm > 0, name
    else:  # the pixel_level grid alone leaves the finer levels untrained
      assert norm == 0.0, name


def test_jit_with_static_model_and_config_matches_eager(full):
  model, params, ema, batch = _setup()
  step_fn = jax.jit(functools.partial(pretrain_loss, model=model, method_cfg=_cfg(),
                                      num_steps=10))
  loss, metrics = step_fn(params, ema, batch, jax.random.key(3), jnp.int32(0))
  for name, value in metrics.items():
    assert float(value) == pytest.approx(float(full[1][name]), rel=1e-4, abs=1e-7), name
  assert float(loss) == pytest.approx(float(full[0]), rel=1e-4)
  # Batch-size agnostic: sample 0 alone has its own overlap 3/4 * 2/4.
  _, one = step_fn(params, ema, {k: v[:1] for k, v in batch.items()}, jax.random.key(3),
                   jnp.int32(0))
  assert float(one['overlap_fraction']) == pytest.approx(0.375)
  assert all(np.isfinite(float(v)) for v in one.values())


def test_bad_method_fields_are_named():
  with pytest.raises(ValueError, match='method.weighting'):
    _loss(_cfg(weighting='softmax'))
  with pytest.raises(ValueError, match='method.match'):
    _loss(_cfg(match='nearest'))


def test_stabilizer_mean_equals_the_mean_of_its_k_samples():
  # The prediction is the last layer on the mean dropped hidden layer: check it is the mean of
  # the K stabilizer outputs, and the uncertainty their channel-mean variance.
  model, params, _, batch = _setup(0.2)
  proj = model.apply({'params': params}, batch['view1'])['pixel_proj']
  key = jax.random.key(5)
  mean, uncertainty = stabilized_prediction(params, proj, key, model=model, mc_samples=4)
  hidden = model.apply({'params': params}, proj, method=PixSSLModel.stabilizer_hidden_layer)
  samples = jnp.stack([
      model.apply({'params': params}, hidden * dropout_scale(hidden.shape, 0.2, k),
                  method=PixSSLModel.stabilizer_output) for k in jax.random.split(key, 4)])
  np.testing.assert_allclose(mean, samples.mean(0), rtol=1e-5, atol=1e-6)
  normed = samples / jnp.linalg.norm(samples, axis=-1, keepdims=True)
  np.testing.assert_allclose(uncertainty, normed.var(0).mean(-1), rtol=1e-4, atol=1e-8)
