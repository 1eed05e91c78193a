"""EMA teacher, momentum schedule and optimizer against hand computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain


def test_ema_momentum_follows_byol_cosine():
  m0, total = 0.996, 100
  cases = [(0, 0.996), (50, 0.998), (100, 1.0), (25, 1 - 0.004 * (np.cos(np.pi / 4) + 1) / 2)]
  for step, expected in cases:
    np.testing.assert_allclose(pretrain.ema_momentum(step, total, m0), expected, rtol=0, atol=1e-7)
  # Past the end it stays at 1 rather than coming back down the cosine.
  np.testing.assert_allclose(pretrain.ema_momentum(150, total, m0), 1.0, atol=1e-7)


@pytest.mark.parametrize('num_steps', [4, 180, 300, 20_000])
def test_derived_momentum_leaves_at_most_the_configured_share(num_steps):
  share = 1e-3
  m0 = pretrain.derived_ema_momentum(num_steps, share)
  # The product of the float32 momenta the step applies, over the whole run.
  momenta = np.asarray(pretrain.ema_momentum(np.arange(num_steps), num_steps, m0), np.float64)
  final = np.prod(momenta)
  assert 0.99 * share < final <= share
  np.testing.assert_allclose(pretrain.teacher_init_share(num_steps, num_steps, m0), final,
                             rtol=1e-3)
  # Nothing is left to move after the last step.
  assert float(pretrain.teacher_init_share(num_steps + 7, num_steps, m0)) == pytest.approx(
      float(pretrain.teacher_init_share(num_steps, num_steps, m0)))


def test_teacher_init_share_by_hand():
  m0, total = 0.9, 4
  momenta = [1 - 0.1 * (np.cos(np.pi * k / total) + 1) / 2 for k in range(total)]
  for step in range(total + 1):
    np.testing.assert_allclose(pretrain.teacher_init_share(jnp.int32(step), total, m0),
                               np.prod(momenta[:step]), rtol=1e-6)


def test_base_momentum_is_byol_for_long_runs_and_lowered_for_short_ones():
  cfg = _optim(ema_momentum=0.996, ema_final_init_share=1e-3)
  assert pretrain.base_ema_momentum(cfg, 20_000) == 0.996  # BYOL's m0 already leaves e^-40
  short = pretrain.base_ema_momentum(cfg, 300)
  assert short == pytest.approx(pretrain.derived_ema_momentum(300, 1e-3)) and short < 0.96
  # With the share 0 or None, m0 is ema_momentum.
  for off in (0.0, None):
    assert pretrain.base_ema_momentum(_optim(ema_momentum=0.996, ema_final_init_share=off),
                                       300) == 0.996
  with pytest.raises(ValueError, match='ema_final_init_share'):
    pretrain.derived_ema_momentum(300, 1.5)


def test_ema_update_by_hand():
  teacher = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array(4.0)}
  student = {'w': jnp.array([3.0, 0.0]), 'b': jnp.array(0.0)}
  out = pretrain.ema_update(teacher, student, jnp.float32(0.75))
  np.testing.assert_allclose(out['w'], [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0])
  np.testing.assert_allclose(out['b'], 3.0)


def _optim(**overrides):
  cfg = ml_collections.ConfigDict(dict(name='adamw', learning_rate=0.1, warmup_steps=4,
                                       weight_decay=0.0, grad_clip=0.0, ema_momentum=0.99,
                                       ema_final_init_share=0.0))
  cfg.update(overrides)
  return cfg


def test_schedule_warms_up_then_decays_to_zero():
  schedule = optimizers.learning_rate_schedule(_optim(), num_steps=20)
  # Step k uses the curve at k + 1: the first step already learns.
  np.testing.assert_allclose([schedule(0), schedule(1), schedule(3)], [0.025, 0.05, 0.1],
                             atol=1e-7)
  rates = [float(schedule(k)) for k in range(3, 20)]
  assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
  np.testing.assert_allclose(schedule(20), 0.0, atol=1e-7)


@pytest.mark.parametrize('name', ['adamw', 'lars'])
def test_optimizer_descends_and_decays_only_kernels(name):
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  tx = optimizers.make_optimizer(_optim(name=name, weight_decay=0.5, warmup_steps=0), 10)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  # With zero gradients only weight decay moves parameters: kernels shrink, biases do not.
  assert float(jnp.max(updates['kernel'])) < 0
  np.testing.assert_array_equal(updates['bias'], 0.0)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="config.optim.name: unknown optimizer 'sgdx'"):
    optimizers.make_optimizer(_optim(name='sgdx'), 10)


def test_create_train_state_copies_student_to_teacher():
  params = {'kernel': jnp.arange(4.0).reshape(2, 2)}
  tx = optimizers.make_optimizer(_optim(), 10)
  st = pretrain.create_train_state(params, tx)
  assert int(st.step) == 0
  np.testing.assert_array_equal(st.ema_params['kernel'], params['kernel'])
