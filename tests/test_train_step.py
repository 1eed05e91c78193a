"""The jitted pre-training step: device-count invariance and the teacher update."""

import jax
import numpy as np
import pytest

from pixssl_jax.models import pixssl
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain
from tests.helpers import load_config, random_batch


def run_one_step(config, devices):
  mesh = mesh_lib.make_data_mesh(devices)
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  state = pretrain.init_train_state(model, tx, config, mesh)
  before = jax.device_get(state)
  step = loop.jit_train_step(pretrain.train_step, model, tx, config, mesh)
  state, metrics = step(state, mesh_lib.global_batch(random_batch(config), mesh))
  return before, jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope='module')
def tiny_config():
  return load_config('tiny')


@pytest.fixture(scope='module')
def one_device_step(tiny_config):
  return run_one_step(tiny_config, jax.devices()[:1])


def test_one_and_eight_devices_agree(tiny_config, one_device_step):
  assert jax.device_count() == 8
  _, state1, metrics1 = one_device_step
  _, state8, metrics8 = run_one_step(tiny_config, jax.devices())
  for key in ('loss', 'loss_global', 'loss_pixel', 'grad_norm'):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               state8.params, state1.params)


def test_step_updates_student_and_moves_teacher_by_ema(tiny_config, one_device_step):
  before, after, metrics = one_device_step
  assert int(after.step) == 1
  base = pretrain.base_ema_momentum(tiny_config.optim, tiny_config.num_steps)
  momentum = float(pretrain.ema_momentum(0, tiny_config.num_steps, base))
  np.testing.assert_allclose(metrics['ema_momentum'], momentum, rtol=1e-6)
  # One update keeps m0 of the initialisation.
  np.testing.assert_allclose(metrics['teacher_init_share'], momentum, rtol=1e-5)
  expected = jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s,
                          before.ema_params, after.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after.ema_params, expected)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before.params, after.params)
  assert any(jax.tree.leaves(changed)), 'the optimizer did not move the student'
  for key in ('loss', 'loss_global', 'loss_pixel', 'uncertainty_mean', 'uncertainty_p90',
              'overlap_fraction', 'ema_momentum', 'lr', 'grad_norm', 'teacher_init_share',
              'weight_cv', 'weight_ess', 'keep_fraction', 'uncertainty_spearman',
              'pixel_effective_rank'):
    assert np.isfinite(metrics[key]), key
    assert metrics[key].dtype == np.float32 and metrics[key].shape == (), key
  assert 0.0 < metrics['overlap_fraction'] < 1.0
