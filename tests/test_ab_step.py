"""benchmarks/ab_step.py: its variants really swap the code and restore it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import ab_step
from pixssl_jax import config_files
from pixssl_jax import xla_options
from pixssl_jax.models import dropout_bits
from pixssl_jax.models import layers
from pixssl_jax.models import pixssl
from pixssl_jax.models.cpu_layers import conv_ops
from pixssl_jax.models.heads import dropout_scale


def test_threefry_variant_swaps_the_dropout_bits_and_restores_them():
  key, shape = jax.random.key(0), (2, 4, 4, 8)
  current = np.asarray(dropout_scale(shape, 0.5, key))
  with ab_step.VARIANTS['threefry_bits']():
    patched = np.asarray(dropout_scale(shape, 0.5, key))
    np.testing.assert_array_equal(np.asarray(dropout_bits.hashed_bits(key, (3,))),
                                  np.asarray(jax.random.bits(key, (3,))))
  assert not np.array_equal(current, patched)
  np.testing.assert_array_equal(np.asarray(dropout_scale(shape, 0.5, key)), current)


def test_flax_layers_variant_sets_the_layer_set_field():
  config = config_files.load('pretrain', 'tiny')
  changed = ab_step.variant_config(config, 'flax_layers')
  assert config.model.layers == 'auto' and changed.model.layers == 'flax'
  assert pixssl.build_model(changed.model, 2).layers is layers.FLAX
  assert ab_step.variant_config(config, 'threefry_bits').model.layers == 'auto'


def test_option_variants_compile_with_their_options_and_restore_them():
  xla_options.compiler_options.cache_clear()
  before = xla_options.compiler_options()
  with ab_step.VARIANTS['serial_scheduler']():
    assert xla_options.compiler_options() == {
        **before, 'xla_cpu_enable_concurrency_optimized_scheduler': False}
  assert xla_options.compiler_options() == before
  # An option this jaxlib rejects is an error, not a silent run on XLA's defaults.
  with pytest.raises(ValueError, match='xla_cpu_no_such_option'):
    with ab_step._cpu_options(xla_cpu_no_such_option='x'):  # pylint: disable=protected-access
      pass
  assert xla_options.compiler_options() == before


@pytest.mark.parametrize('variant', ['depth_taps_shared', 'depth_taps_sliced', 'taps_on_outputs',
                                     'two_output_slices'])
@pytest.mark.parametrize('stride, cout', [(1, 4), (1, 24), (2, 4)])
def test_conv_form_variants_compute_the_same_convolution_and_restore_it(variant, stride, cout):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, cout)), jnp.float32)
  folded = conv_ops.conv_folding_first_axis
  expected = folded(x, kernel, stride)
  with ab_step.VARIANTS[variant]():
    assert conv_ops.conv_folding_first_axis is not folded
    got = conv_ops.conv_folding_first_axis(x, kernel, stride)
  assert conv_ops.conv_folding_first_axis is folded
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_chunked_kernel_grad_variant_gives_the_same_gradients(stride):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 16, 6, 5, 3)), jnp.float32)  # 32 (or 16) folded slices.
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
  loss = lambda x, k: jnp.sum(jnp.sin(conv_ops.conv_folding_first_axis(x, k, stride)))
  expected = jax.grad(loss, argnums=(0, 1))(x, kernel)
  with ab_step.VARIANTS['chunked_kernel_grad']():
    got = jax.grad(loss, argnums=(0, 1))(x, kernel)
  assert conv_ops.spatial_conv is ab_step._SPATIAL  # pylint: disable=protected-access
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', [(1, 4, 4, 4, 2), (2, 6, 6, 2)])
def test_no_kernel_grad_variant_stops_only_the_kernel_gradient(shape):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  conv = conv_ops.Conv(3, (3,) * (len(shape) - 2))
  params = conv.init(jax.random.key(0), x)
  loss = lambda x, params: jnp.sum(conv.apply(params, x) ** 2)
  dx, dparams = jax.grad(loss, argnums=(0, 1))(x, params)
  with ab_step.VARIANTS['no_kernel_grad']():
    dx_stopped, dparams_stopped = jax.grad(loss, argnums=(0, 1))(x, params)
  assert conv_ops.spatial_conv is ab_step._SPATIAL  # pylint: disable=protected-access
  kernel, kernel_stopped = dparams['params']['kernel'], dparams_stopped['params']['kernel']
  assert float(jnp.abs(kernel).max()) > 0 and float(jnp.abs(kernel_stopped).max()) == 0
  np.testing.assert_allclose(dparams_stopped['params']['bias'], dparams['params']['bias'],
                             rtol=1e-6)
  np.testing.assert_allclose(dx_stopped, dx, rtol=1e-6)
