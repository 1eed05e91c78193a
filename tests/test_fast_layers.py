"""The CPU layer set's forms (models/cpu_layers/) equal Flax's, with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax.models import layers
from pixssl_jax.models import unet
from pixssl_jax.models.cpu_layers import conv_ops
from pixssl_jax.models.cpu_layers import dense
from pixssl_jax.models.cpu_layers import group_norm
from pixssl_jax.models.cpu_layers import strided_conv


def _values_and_grads(module, params, x):
  def loss(p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)))
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


def _conv_case(shape, kernel_size):
  """Random `x` of `shape` `[B, *S, Cin]` and a random `[k, ..., k, Cin, 4]` kernel."""
  n = len(shape) - 2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  return x, jax.random.normal(jax.random.PRNGKey(1), (kernel_size,) * n + (shape[-1], 4))


def _conv_grads(conv, x, kernel, stride):
  """Gradients of `sum(sin(conv(x, kernel, stride)))` with respect to `x` and `kernel`."""
  return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride))), argnums=(0, 1))(x, kernel)


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


@pytest.mark.parametrize('shape,kernel_size', [
    ((1, 5, 7, 2), 3), ((1, 5, 4, 3, 2), 3), ((2, 6, 5, 4, 3), 3), ((1, 7, 6, 5, 2), 5),
    ((2, 4, 4, 4, 3), 1)])
@pytest.mark.parametrize('stride', [1, 2])
def test_folded_conv_and_its_gradients_match_lax(shape, kernel_size, stride):
  # The folded path itself and its gradients, on odd sizes (other 'SAME' pads), kernels 1-5
  # and in 2-D (a 1-D inner convolution).
  x, kernel = _conv_case(shape, kernel_size)
  np.testing.assert_allclose(conv_ops.conv_folding_first_axis(x, kernel, stride),
                             strided_conv.conv(x, kernel, stride), rtol=1e-5, atol=1e-5)
  expected = _conv_grads(strided_conv.conv, x, kernel, stride)
  got = _conv_grads(conv_ops.conv_folding_first_axis, x, kernel, stride)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize('shape', [(6, 5), (2, 4, 3, 5), (2, 3, 4, 2, 5)])
def test_dense_matches_flax_dense(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref, new = nn.Dense(7), dense.Dense(7)
  params = ref.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # A nonzero bias.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _values_and_grads(ref, params, x), _values_and_grads(new, params, x))
  y, bias = dense.Dense(7).apply(params, x, defer_bias=True)
  np.testing.assert_allclose(y + bias, ref.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,kernel_size,stride', [
    ((2, 8, 6, 3), 3, 2), ((1, 7, 5, 3), 3, 2), ((1, 9, 8, 2), 3, 3), ((1, 8, 7, 2), 2, 2),
    ((1, 6, 5, 2), 1, 2), ((1, 11, 10, 2), 5, 3), ((1, 5, 4, 7, 2), 3, 2), ((3, 9, 2), 3, 2)])
def test_strided_conv_gradients_match_jax(shape, kernel_size, stride):
  # The phase-form input gradient against JAX's input-dilated one: 1-D to 3-D, even and odd
  # sizes (other 'SAME' pads), kernels that give phases with no taps (1) or uneven ones.
  x, kernel = _conv_case(shape, kernel_size)
  expected = _conv_grads(strided_conv.conv, x, kernel, stride)
  got = _conv_grads(strided_conv.strided_conv, x, kernel, stride)
  np.testing.assert_allclose(strided_conv.strided_conv(x, kernel, stride),
                             strided_conv.conv(x, kernel, stride), rtol=1e-6)
  for a, b in zip(expected, got):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_strided_conv_backward_has_no_input_dilated_convolution():
  # The point of the phase form: XLA:CPU runs an input-dilated (lhs_dilate) convolution as a
  # slow loop; the block's compiled backward must not contain one.
  x = jnp.zeros((1, 8, 8, 8, 4))
  block = unet.ConvBlock(8, 3, 2, strides=2, layers=layers.CPU)
  params = block.init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x)), argnums=(0, 1)))
  hlo = grad.lower(params, x).compile().as_text()
  assert 'convolution(' in hlo
  assert 'lhs_dilate' not in hlo


@pytest.mark.parametrize('shape', [(2, 4, 3, 6), (2, 2, 3, 4, 6)])
def test_conv_transpose_matches_flax(shape):
  n = len(shape) - 2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = nn.ConvTranspose(5, (2,) * n, strides=(2,) * n, padding='SAME')
  new = conv_ops.ConvTranspose2x(5, (2,) * n, (2,) * n)
  params = ref.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)
  expected, new_out = _values_and_grads(ref, params, x), _values_and_grads(new, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               expected, new_out)



class _GroupNormAfterBias(nn.Module):
  """Reference: Flax's GroupNorm of `x + pre_bias`, the bias added first."""

  @nn.compact
  def __call__(self, x, pre_bias):
    return nn.GroupNorm(num_groups=4, name='norm')(x + pre_bias)


class _FastGroupNorm(nn.Module):

  @nn.compact
  def __call__(self, x, pre_bias):
    return group_norm.GroupNorm(4, name='norm')(x, pre_bias)


@pytest.mark.parametrize('shape', [(2, 6, 5, 8), (2, 3, 4, 5, 8)])
def test_group_norm_with_folded_bias_matches_flax(shape):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), shape)  # Mean far from 0.
  pre_bias = jax.random.normal(jax.random.PRNGKey(1), shape[-1:])
  ref, new = _GroupNormAfterBias(), _FastGroupNorm()
  params = ref.init(jax.random.PRNGKey(2), x, pre_bias)
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(2), x, pre_bias))
  params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.PRNGKey(3), p.shape), params)

  def values_and_grads(module):
    def loss(p, x, b):
      return jnp.sum(jnp.sin(3.0 * module.apply(p, x, b)))
    return module.apply(params, x, pre_bias), jax.grad(loss, argnums=(0, 1, 2))(params, x,
                                                                                  pre_bias)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               values_and_grads(ref), values_and_grads(new))


def test_group_norm_rejects_indivisible_channels():
  with pytest.raises(ValueError, match='6 channels not divisible by 4 groups'):
    group_norm.GroupNorm(4).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 6)))


class _FlaxConvBlock(nn.Module):
  """unet.ConvBlock written with Flax's own layers (bias added by the conv, nn.GroupNorm)."""
  features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    for i, stride in enumerate((self.strides, 1)):
      x = nn.Conv(self.features, (3,) * n, (stride,) * n, padding='SAME', name=f'conv{i}')(x)
      x = nn.leaky_relu(nn.GroupNorm(num_groups=4, name=f'norm{i}')(x), 0.01)
    return x


@pytest.mark.parametrize('layer_set', [layers.FLAX, layers.CPU], ids=['flax', 'cpu'])
@pytest.mark.parametrize('shape,stride', [((2, 8, 6, 3), 1), ((2, 8, 6, 3), 2),
                                          ((2, 4, 6, 4, 3), 2)])
def test_conv_block_matches_flax_layers(shape, stride, layer_set):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = _FlaxConvBlock(8, stride)
  new = unet.ConvBlock(8, len(shape) - 2, num_groups=4, strides=stride, layers=layer_set)
  params = ref.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, new.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # Nonzero conv biases, reaching the norm.
  expected, new_out = _values_and_grads(ref, params, x), _values_and_grads(new, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               expected, new_out)


def test_cpu_forms_reject_what_they_do_not_implement():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match="padding='SAME'"):
    conv_ops.Conv(3, (3, 3), padding='VALID').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='kernel_size must be'):
    conv_ops.ConvTranspose2x(3, (3, 3), (2, 2)).init(jax.random.PRNGKey(0), x)
