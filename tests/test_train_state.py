"""EMA teacher, momentum schedule and optimizer against hand computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixssl_jax.train import state as state_lib


def test_ema_momentum_follows_byol_cosine():
  m0, total = 0.996, 100
  cases = [(0, 0.996), (50, 0.998), (100, 1.0), (25, 1 - 0.004 * (np.cos(np.pi / 4) + 1) / 2)]
  for step, expected in cases:
    np.testing.assert_allclose(state_lib.ema_momentum(step, total, m0), expected, rtol=0, atol=1e-7)
  # Past the end it stays at 1 rather than coming back down the cosine.
  np.testing.assert_allclose(state_lib.ema_momentum(150, total, m0), 1.0, atol=1e-7)


def test_ema_update_by_hand():
  teacher = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array(4.0)}
  student = {'w': jnp.array([3.0, 0.0]), 'b': jnp.array(0.0)}
  out = state_lib.ema_update(teacher, student, jnp.float32(0.75))
  np.testing.assert_allclose(out['w'], [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0])
  np.testing.assert_allclose(out['b'], 3.0)


def _optim(**overrides):
  cfg = ml_collections.ConfigDict(dict(name='adamw', learning_rate=0.1, warmup_steps=4,
                                       weight_decay=0.0, grad_clip=0.0, ema_momentum=0.99))
  cfg.update(overrides)
  return cfg


def test_schedule_warms_up_then_decays_to_zero():
  schedule = state_lib.learning_rate_schedule(_optim(), num_steps=20)
  # Step k uses the curve at k + 1: the first step already learns.
  np.testing.assert_allclose([schedule(0), schedule(1), schedule(3)], [0.025, 0.05, 0.1],
                             atol=1e-7)
  rates = [float(schedule(k)) for k in range(3, 20)]
  assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
  np.testing.assert_allclose(schedule(20), 0.0, atol=1e-7)


@pytest.mark.parametrize('name', ['adamw', 'lars'])
def test_optimizer_descends_and_decays_only_kernels(name):
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  tx = state_lib.make_optimizer(_optim(name=name, weight_decay=0.5, warmup_steps=0), 10)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  # With zero gradients only weight decay moves parameters: kernels shrink, biases do not.
  assert float(jnp.max(updates['kernel'])) < 0
  np.testing.assert_array_equal(updates['bias'], 0.0)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="config.optim.name: unknown optimizer 'sgdx'"):
    state_lib.make_optimizer(_optim(name='sgdx'), 10)


def test_create_train_state_copies_student_to_teacher():
  params = {'kernel': jnp.arange(4.0).reshape(2, 2)}
  tx = state_lib.make_optimizer(_optim(), 10)
  st = state_lib.create_train_state(params, tx)
  assert int(st.step) == 0
  np.testing.assert_array_equal(st.ema_params['kernel'], params['kernel'])
