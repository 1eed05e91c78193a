"""VICReg variance/covariance terms: values on features whose statistics are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax.losses import variance_covariance


def test_spread_out_uncorrelated_features_cost_nothing():
  # Channels +-2 and +-3 around 5 (stds 2.3 and 3.5, above 1), exactly uncorrelated: their
  # +-1 patterns are orthogonal over the 4 samples.
  z = np.array([[2, 3], [-2, 3], [2, -3], [-2, -3]], np.float32) + 5.0
  variance, covariance = variance_covariance(jnp.asarray(z))
  assert float(variance) == 0.0
  assert float(covariance) == pytest.approx(0.0, abs=1e-6)


def test_collapsed_features_pay_the_full_hinge():
  # Every pixel the same vector: std 0 in every channel, so relu(1 - sqrt(eps)) each.
  variance, covariance = variance_covariance(jnp.ones((3, 5, 5, 8)))
  assert float(variance) == pytest.approx(1.0 - np.sqrt(1e-4), rel=1e-6)
  assert float(covariance) == 0.0


def test_correlated_channels_by_hand():
  # Channel 1 = 2 * channel 0 over samples (-1, 1, -1, 1)/2: var0 = 1/3, var1 = 4/3 (unbiased),
  # cov01 = 2/3; covariance = 2 * (2/3)^2 / 2; variance = mean(relu(1 - sqrt(var + eps))).
  x = np.array([-0.5, 0.5, -0.5, 0.5], np.float32)
  z = np.stack([x, 2 * x], axis=-1)
  variance, covariance = variance_covariance(jnp.asarray(z))
  assert float(covariance) == pytest.approx((2 / 3) ** 2, rel=1e-5)
  assert float(variance) == pytest.approx(
      (max(0, 1 - np.sqrt(1 / 3 + 1e-4)) + max(0, 1 - np.sqrt(4 / 3 + 1e-4))) / 2, rel=1e-5)


def test_gradient_spreads_collapsed_features():
  """A gradient step on the variance term raises the per-channel spread."""
  z = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)) * 0.01, jnp.float32)
  loss = lambda f: sum(variance_covariance(f))
  stepped = z - 1.0 * jax.grad(loss)(z)
  assert float(jnp.std(stepped, axis=0).min()) > float(jnp.std(z, axis=0).max())
