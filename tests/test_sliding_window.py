"""Sliding-window inference: window placement, weighting, stride, padding and one jit shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax.evaluation import sliding_window as sw


def _counting_jit(fn):
  """jax.jit(fn) plus a list that grows by one per trace (= per compiled shape)."""
  traces = []

  def traced(x):
    traces.append(x.shape)
    return fn(x)
  return jax.jit(traced), traces


def test_window_starts_follow_nnunet():
  assert sw.window_starts(10, 4, 0.5) == [0, 2, 4, 6]
  assert sw.window_starts(11, 4, 0.5) == [0, 2, 4, 5, 7]     # Step 7/4 rounded; last flush.
  assert sw.window_starts(4, 4, 0.5) == [0]
  assert sw.window_starts(13, 4, 0.0) == [0, 3, 6, 9]
  with pytest.raises(ValueError, match='shorter'):
    sw.window_starts(3, 4, 0.5)


def test_importance_map():
  g = sw.importance_map((8, 6))
  assert g.shape == (8, 6) and g.dtype == np.float32
  assert g.max() == pytest.approx(1.0, abs=1e-6) and g.min() > 0
  np.testing.assert_allclose(g, g[::-1, ::-1], rtol=1e-6)   # Centred on (P - 1) / 2.
  np.testing.assert_allclose(g[0, 2:4] / g[3, 2:4], np.exp(-0.5 * (3.5 / 1.0)**2 + 0.5 * 0.25),
                             rtol=1e-5)                     # sigma = 8 / 8 along axis 0.
  np.testing.assert_array_equal(sw.importance_map((3, 4, 5), gaussian=False), 1.0)


def test_identity_is_reproduced_in_3d_with_one_jit_shape():
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(13, 10, 7, 2)).astype(np.float32)   # No axis divisible by 4.
  apply_fn, traces = _counting_jit(lambda x: x * 1.0)
  out = sw.sliding_window_inference(apply_fn, volume, patch_size=(4, 4, 4), batch_size=3)
  assert out.shape == volume.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, volume, rtol=1e-5, atol=1e-6)
  # 6 * 4 * 3 = 72 windows in 24 batches, one trace; a second volume reuses it.
  sw.sliding_window_inference(apply_fn, volume[:9], patch_size=(4, 4, 4), batch_size=3)
  assert traces == [(3, 4, 4, 4, 2)]


def test_uniform_average_of_window_local_coordinate():
  # Output = the voxel's coordinate inside its window along axis 0. With starts 0, 2, 4, 6
  # and uniform weights, voxel x averages x - s over the windows s <= x < s + 4 that hold it.
  def local_coordinate(x):
    coord = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None]
    return jnp.broadcast_to(coord, x.shape[:3] + (1,)) + 0.0 * x[..., :1]
  volume = np.zeros((10, 4, 1), np.float32)
  out = sw.sliding_window_inference(jax.jit(local_coordinate), volume, patch_size=(4, 4),
                                    gaussian=False, batch_size=2)
  expected = [0, 1, 1, 2, 1, 2, 1, 2, 2, 3]
  np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out, np.broadcast_to(out[:, :1], out.shape))
  # Gaussian weights (sigma 0.5, centre 1.5) favour the window in which a voxel is nearer the
  # centre: voxel 2 is local 2 (0.5 off, weight 1) in window 0 and local 0 (1.5 off, weight
  # exp(-4) after normalisation) in window 2; voxel 3 is local 3 and local 1.
  out_g = sw.sliding_window_inference(jax.jit(local_coordinate), volume, patch_size=(4, 4),
                                      batch_size=2)
  far = np.exp(-4.0)
  assert out_g[2, 0, 0] == pytest.approx((2 * 1.0 + 0 * far) / (1 + far), rel=1e-5)
  assert out_g[3, 0, 0] == pytest.approx((3 * far + 1 * 1.0) / (1 + far), rel=1e-5)
  assert out_g[0, 0, 0] == pytest.approx(0.0, abs=1e-6)


def test_constant_apply_fn_gives_constants_on_a_padded_2d_slice():
  apply_fn = jax.jit(lambda x: jnp.zeros(x.shape[:-1] + (3,)) + jnp.array([1.0, -2.0, 0.5]))
  out = sw.sliding_window_inference(apply_fn, np.ones((5, 9, 1)), patch_size=(8, 8))
  assert out.shape == (5, 9, 3)
  np.testing.assert_allclose(out, np.broadcast_to([1.0, -2.0, 0.5], out.shape), rtol=1e-6)


def test_small_volume_is_padded_with_its_minimum_and_cropped_back():
  volume = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5, 1) + 10.0
  seen = []

  def record(x):
    seen.append(np.asarray(x))
    return x
  out = sw.sliding_window_inference(record, volume, patch_size=(4, 4, 4), batch_size=1)
  np.testing.assert_allclose(out, volume, rtol=1e-6)
  # Windows along z: starts 0 and 1 over 5 voxels; padding in x and y holds the minimum, 10.
  assert len(seen) == 2 and seen[0].shape == (1, 4, 4, 4, 1)
  assert seen[0][0, 2:, :, :, 0].min() == 10.0 and seen[0][0, 2:, :, :, 0].max() == 10.0
  out_zero = sw.sliding_window_inference(lambda x: x, volume, patch_size=(4, 4, 4),
                                         pad_value=0.0)
  np.testing.assert_allclose(out_zero, volume, rtol=1e-6)


def test_output_stride_two_averages_cells():
  rng = np.random.default_rng(1)
  volume = rng.normal(size=(12, 10, 6, 1)).astype(np.float32)

  def avg_pool(x):
    b, h, w, d, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, d // 2, 2, c).mean((2, 4, 6))
  out = sw.sliding_window_inference(jax.jit(avg_pool), volume, patch_size=(4, 4, 4),
                                    output_stride=2, batch_size=4)
  expected = volume.reshape(6, 2, 5, 2, 3, 2, 1).mean((1, 3, 5))
  assert out.shape == (6, 5, 3, 1)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # An odd axis is padded to whole cells: ceil(5 / 2) = 3 output cells along z.
  out_odd = sw.sliding_window_inference(jax.jit(avg_pool), volume[:, :, :5], patch_size=(4, 4, 4),
                                        output_stride=2)
  assert out_odd.shape == (6, 5, 3, 1)
  np.testing.assert_allclose(out_odd[:, :, :2], expected[:, :, :2], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
  vol = np.zeros((8, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match='spatial axes'):
    sw.sliding_window_inference(lambda x: x, vol, patch_size=(4, 4))
  with pytest.raises(ValueError, match='output_stride'):
    sw.sliding_window_inference(lambda x: x, vol, patch_size=(4, 4, 6), output_stride=4)
  with pytest.raises(ValueError, match='overlap'):
    sw.sliding_window_inference(lambda x: x, vol, patch_size=(4, 4, 4), overlap=1.0)
  with pytest.raises(ValueError, match='apply_fn returned shape'):
    sw.sliding_window_inference(lambda x: x[:, :2], vol, patch_size=(4, 4, 4))
