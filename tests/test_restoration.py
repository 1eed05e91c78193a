"""The restoration loss term: its error by hand, the student's masked input, its head, checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax import objective
from pixssl_jax.models.pixssl import build_model
from pixssl_jax.models.pixssl import init_params
from pixssl_jax.objective import restoration_term
from pixssl_jax.objective.pretrain_loss import student_input
from pixssl_jax.train import config_checks

PATCH = 16


def _method(**overrides):
  method = config_files.load('pretrain', 'demo').method
  method.update(use_global=False, use_pixel=False, lambda_variance=0.0, lambda_covariance=0.0,
                lambda_restoration=2.0)
  method.update(overrides)
  return method


def _batch():
  rng = np.random.default_rng(0)
  eye = np.tile(np.concatenate([np.eye(2), np.zeros((2, 1))], 1), (2, 1, 1)).astype(np.float32)
  hidden = np.zeros((2, PATCH, PATCH, 1), bool)
  hidden[:, :8, :8] = True  # One 8x8 cell of each view hidden.
  return {'view1': jnp.asarray(rng.random((2, PATCH, PATCH, 1)), jnp.float32),
          'view2': jnp.asarray(rng.random((2, PATCH, PATCH, 1)), jnp.float32),
          'transform1': jnp.asarray(eye), 'transform2': jnp.asarray(eye),
          'student_mask1': jnp.asarray(hidden), 'student_mask2': jnp.asarray(hidden)}


def _model(method):
  cfg = config_files.load('pretrain', 'tiny').model
  return build_model(cfg, 2, **objective.model_heads(method))


def test_restoration_error_by_hand():
  target = np.zeros((1, 2, 2, 1), np.float32)
  recon = np.asarray([[[[1.0], [2.0]], [[-3.0], [0.5]]]], np.float32)
  hidden = np.asarray([[[[True], [False]], [[True], [False]]]])
  assert float(restoration_term.restoration_error(recon, target, hidden, 'l2')) == 5.0
  assert float(restoration_term.restoration_error(recon, target, hidden, 'l1')) == 2.0
  assert float(restoration_term.restoration_error(recon, target, None, 'l1')) == 6.5 / 4
  assert float(restoration_term.restoration_error(recon, target, hidden & False, 'l2')) == 0.0


def test_student_sees_zeros_where_hidden_and_the_teacher_the_whole_view():
  batch = _batch()
  views = jnp.concatenate([batch['view1'], batch['view2']], 0)
  seen = np.asarray(student_input(batch, views))
  assert np.all(seen[:, :8, :8] == 0.0)
  np.testing.assert_array_equal(seen[:, 8:], np.asarray(views)[:, 8:])
  unmasked = {k: v for k, v in batch.items() if not k.startswith('student_mask')}
  assert student_input(unmasked, views) is views


def test_restoration_only_loss_is_the_weighted_error_of_the_head():
  method = _method()
  model = _model(method)
  params = init_params(model, jax.random.key(0), (1, PATCH, PATCH, 1))
  assert 'restorer' in params  # The head exists only while the term is on.
  assert 'restorer' not in init_params(_model(_method(lambda_restoration=0.0, use_global=True)),
                                       jax.random.key(0), (1, PATCH, PATCH, 1))
  batch = _batch()
  loss, metrics = objective.pretrain_loss(params, params, batch, jax.random.key(1), 0,
                                          model=model, method_cfg=method, num_steps=10)
  views = jnp.concatenate([batch['view1'], batch['view2']], 0)
  recon = model.apply({'params': params}, student_input(batch, views))['restoration']
  hidden = np.concatenate([batch['student_mask1'], batch['student_mask2']], 0)
  expected = np.mean(np.square(np.asarray(recon) - np.asarray(views))[hidden])
  assert float(metrics['loss_restoration']) == pytest.approx(expected, rel=1e-5)
  assert float(loss) == pytest.approx(2.0 * expected, rel=1e-5)
  assert float(metrics['loss_global']) == float(metrics['loss_pixel']) == 0.0
  # Its gradient trains the backbone and the head, not the unused global heads.
  grads = jax.grad(lambda p: objective.pretrain_loss(
      p, params, batch, jax.random.key(1), 0, model=model, method_cfg=method,
      num_steps=10)[0])(params)
  norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  assert norm(grads['backbone']) > 0 and norm(grads['restorer']) > 0
  assert norm(grads['predictor']) == 0.0


def test_config_checks_name_what_restoration_needs():
  config = config_files.load('pretrain', 'tiny')
  config.method.update(use_global=False, use_pixel=False, lambda_restoration=1.0)
  problems = config_checks.pretrain_config_problems(config, device_count=1, process_count=1)
  assert any('lambda_restoration=1.0 needs config.data.mask_ratio > 0' in p for p in problems)
  config.data.mask_ratio = 0.5
  assert config_checks.pretrain_config_problems(config, device_count=1, process_count=1) == []
  config.method.lambda_restoration = 0.0
  problems = config_checks.pretrain_config_problems(config, device_count=1, process_count=1)
  assert any('nothing to learn' in p for p in problems)
  with pytest.raises(ValueError, match='nothing to learn'):
    objective.pretrain_loss({}, {}, _batch(), jax.random.key(0), 0, model=None,
                            method_cfg=config.method, num_steps=1)
