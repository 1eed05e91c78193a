"""The U-Net's fast convolution forms equal Flax's, with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax.models import conv_ops


def _values_and_grads(module, params, x):
  def loss(p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)))
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize('shape,stride', [((2, 8, 6, 3), 1), ((2, 8, 6, 3), 2),
                                          ((2, 4, 6, 8, 3), 1), ((2, 4, 6, 8, 3), 2),
                                          ((1, 5, 7, 3), 2)])
def test_conv_matches_flax_conv(shape, stride):
  n = len(shape) - 2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = nn.Conv(5, (3,) * n, strides=(stride,) * n, padding='SAME')
  new = conv_ops.Conv(5, (3,) * n, stride)
  params = ref.init(jax.random.PRNGKey(1), x)
  # Same parameter tree and the same initial values: checkpoints do not notice the swap.
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # A nonzero bias.
  expected, new_out = _values_and_grads(ref, params, x), _values_and_grads(new, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               expected, new_out)


def test_folded_conv_matches_lax_on_odd_sizes():
  # The folded path itself, also on odd sizes (other 'SAME' pads) and in 2-D (1-D inner conv).
  for shape in ((1, 5, 7, 2), (1, 5, 4, 3, 2)):
    n = len(shape) - 2
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3,) * n + (2, 4))
    for stride in (1, 2):
      expected = jax.lax.conv_general_dilated(
          x, kernel, (stride,) * n, 'SAME',
          dimension_numbers=conv_ops._dimension_numbers(n))  # pylint: disable=protected-access
      np.testing.assert_allclose(conv_ops.conv_folding_first_axis(x, kernel, stride), expected,
                                 rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 4, 3, 6), (2, 2, 3, 4, 6)])
def test_conv_transpose_matches_flax(shape):
  n = len(shape) - 2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = nn.ConvTranspose(5, (2,) * n, strides=(2,) * n, padding='SAME')
  new = conv_ops.ConvTranspose2x(5)
  params = ref.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)
  expected, new_out = _values_and_grads(ref, params, x), _values_and_grads(new, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               expected, new_out)

