"""Tests for the two-view sampler (views.py) and the intensity augmentations."""
import numpy as np
import pytest
from scipy import ndimage

from pixssl_jax import config_files
from pixssl_jax.data import intensity
from pixssl_jax.data import views

WINDOW = (-175.0, 250.0)
VOL_SHAPE = (40, 40, 24)


def _cfg(ndim, *, scale_range=(0.7, 1.4), flip=True, rot90=True, min_overlap=0.3,
         patch=None, enabled=False):
  cfg = config_files.load('pretrain', 'demo').data
  cfg.ndim = ndim
  cfg.patch_size = patch or (16,) * ndim
  cfg.scale_range = scale_range
  cfg.flip = flip
  cfg.rot90 = rot90
  cfg.min_overlap = min_overlap
  cfg.intensity.enabled = enabled
  return cfg


def _random_volume(seed=0, shape=VOL_SHAPE):
  return np.random.default_rng(seed).integers(-175, 251, shape).astype(np.int16)


def _index_grid(shape):
  """[*P, n] integer view indices."""
  return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1)


def _apply(t, pts):
  n = t.shape[0]
  return pts @ t[:, :n].astype(np.float64).T + t[:, n]


def _to_other_view(t1, t2, pts):
  """View-1 indices [..., n] -> view-2 indices, through the source frame."""
  n = t1.shape[0]
  src = _apply(t1, pts)
  a2 = t2[:, :n].astype(np.float64)
  return (src - t2[:, n]) @ np.linalg.inv(a2).T


def _inside(pts, shape):
  return np.all((pts >= -1e-4) & (pts <= np.asarray(shape) - 1 + 1e-4), axis=-1)


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('k', [0, 1, 2, 3])
def test_transform_reproduces_numpy_flip_and_rot90(ndim, k):
  rng = np.random.default_rng(k)
  src = rng.normal(size=(12,) * ndim)
  shape = (6,) * ndim
  start = np.array([2, 5, 1][:ndim])
  for flips in [(False,) * ndim, (True,) + (False,) * (ndim - 1), (True,) * ndim]:
    t = views.crop_transform(start, np.array(shape), shape, flips, k)
    crop = src[tuple(slice(s, s + 6) for s in start)]
    flip_axes = tuple(a for a in range(ndim) if flips[a])
    expected = np.rot90(np.flip(crop, flip_axes) if flip_axes else crop, k, axes=(0, 1))
    fast = views.render_view(src, t, shape, 0.0)
    slow = views.render_view(src, t, shape, 0.0, fast_paths=False)
    np.testing.assert_allclose(fast, expected, atol=1e-6)
    np.testing.assert_allclose(slow, expected, atol=1e-5)


@pytest.mark.parametrize('ndim', [2, 3])
def test_separable_path_equals_affine_transform(ndim):
  rng = np.random.default_rng(ndim)
  src = rng.integers(-175, 251, (14,) * ndim).astype(np.int16)
  shape = (6,) * ndim
  for k, zoom in [(0, 0.7), (1, 1.3), (3, 2.6)]:
    # Starts below zero and boxes past the end exercise the air padding too.
    start = rng.uniform(-3, 8, ndim)
    t = views.crop_transform(start, zoom * np.array(shape), shape, rng.random(ndim) < 0.5, k)
    fast = views.render_view(src, t, shape, -175.0)
    ref = views.render_view(src, t, shape, -175.0, fast_paths=False)
    np.testing.assert_allclose(fast, ref, atol=1e-3)
    assert np.unique(fast).size > 10


def test_crop_transform_follows_the_voxel_centre_convention():
  # src = start + (i + 0.5) * size / P - 0.5 (docs/design.md).
  t = views.crop_transform(np.array([3.0, 5.0]), np.array([16.0, 8.0]), (8, 8))
  np.testing.assert_allclose(t, [[2.0, 0.0, 3.5], [0.0, 1.0, 5.0]])
  # A flip of axis 1 then a quarter turn: view (i0, i1) reads crop (i1, i0) along x.
  t = views.crop_transform(np.zeros(2), np.array([8.0, 8.0]), (8, 8), (False, True), 1)
  np.testing.assert_allclose(t, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_render_view_outside_volume_is_fill():
  src = np.ones((5, 5), np.int16)
  t = views.crop_transform(np.array([-3, 2]), np.array([4, 4]), (4, 4))
  view = views.render_view(src, t, (4, 4), -175.0)
  np.testing.assert_array_equal(view[:3], -175.0)
  np.testing.assert_array_equal(view[3:, :3], 1.0)
  np.testing.assert_array_equal(view[3:, 3], -175.0)


@pytest.mark.parametrize('ndim', [2, 3])
def test_source_coordinates_of_matched_voxels_agree(ndim):
  """Views sample the source at T @ i, and matched voxels share a source coordinate."""
  cfg = _cfg(ndim)
  shape = views.patch_shape(cfg)
  volume = _random_volume(1)
  grid = _index_grid(shape).reshape(-1, ndim).astype(np.float64)
  margin = 4
  # Coordinate-valued sources, extended by a margin so that boundary samples stay affine.
  coord_src = np.meshgrid(*[np.arange(-margin, s + margin, dtype=np.float64)
                            for s in VOL_SHAPE[:ndim]], indexing='ij')
  for seed in range(4):
    pair = views.sample_view_pair(volume, np.random.default_rng(seed), cfg, WINDOW)
    assert pair.view1.shape == shape and pair.view1.dtype == np.float32
    assert pair.transform1.shape == (ndim, ndim + 1) and pair.transform1.dtype == np.float32
    source = volume[:, :, pair.slice_index] if ndim == 2 else volume
    assert (pair.slice_index is None) == (ndim == 3)
    for view, t in [(pair.view1, pair.transform1), (pair.view2, pair.transform2)]:
      np.testing.assert_array_equal(view, views.render_view(source, t, shape, WINDOW[0]))

    def coord_views(t):
      shifted = t.copy()
      shifted[:, ndim] += margin
      return np.stack([views.render_view(c, shifted, shape, np.nan) for c in coord_src], -1)

    c1, c2 = coord_views(pair.transform1), coord_views(pair.transform2)
    # Each voxel of view 1 holds the source coordinate T1 @ [i, 1].
    np.testing.assert_allclose(c1.reshape(-1, ndim), _apply(pair.transform1, grid), atol=2e-3)
    # Its match in view 2 (through T2^-1) reads the same coordinate there.
    j = _to_other_view(pair.transform1, pair.transform2, grid)
    ok = _inside(j, shape)
    assert ok.mean() >= cfg.min_overlap
    read = np.stack([ndimage.map_coordinates(c2[..., a], j[ok].T, order=1)
                     for a in range(ndim)], -1)
    np.testing.assert_allclose(read, c1.reshape(-1, ndim)[ok], atol=2e-3)


@pytest.mark.parametrize('ndim', [2, 3])
def test_matched_intensities_agree_without_intensity_augmentation(ndim):
  cfg = _cfg(ndim, scale_range=None, min_overlap=0.5)
  shape = views.patch_shape(cfg)
  volume = _random_volume(2)
  grid = _index_grid(shape).reshape(-1, ndim).astype(np.float64)
  for seed in range(4):
    rng = np.random.default_rng(seed)
    pair = views.sample_view_pair(volume, rng, cfg, WINDOW)
    # Integer transforms: every match is an exact voxel.
    for t in (pair.transform1, pair.transform2):
      np.testing.assert_array_equal(t, np.round(t))
    v1 = intensity.augment_intensity(pair.view1, rng, cfg.intensity, WINDOW)
    v2 = intensity.augment_intensity(pair.view2, rng, cfg.intensity, WINDOW)
    j = _to_other_view(pair.transform1, pair.transform2, grid)
    ok = _inside(j, shape)
    assert ok.mean() >= 0.5
    i_ok = grid[ok].astype(int)
    j_ok = np.round(j[ok]).astype(int)
    a = v1[tuple(i_ok.T)]
    b = v2[tuple(j_ok.T)]
    np.testing.assert_array_equal(a, b)
    assert np.unique(a).size > 20  # Random content: agreement is not an accident.


@pytest.mark.parametrize('ndim,min_overlap', [(2, 0.9), (3, 0.8), (3, 0.3)])
def test_overlap_fraction_meets_minimum(ndim, min_overlap):
  cfg = _cfg(ndim, min_overlap=min_overlap)
  shape = views.patch_shape(cfg)
  volume = _random_volume(3)
  grid = _index_grid(shape).reshape(-1, ndim).astype(np.float64)
  for seed in range(6):
    pair = views.sample_view_pair(volume, np.random.default_rng(seed), cfg, WINDOW)
    frac1 = _inside(_to_other_view(pair.transform1, pair.transform2, grid), shape).mean()
    frac2 = _inside(_to_other_view(pair.transform2, pair.transform1, grid), shape).mean()
    assert min(frac1, frac2) >= min_overlap, (seed, frac1, frac2)


def test_box_overlap_fractions_counts_voxel_centres():
  # 1-D halves: boxes [0, 8) and [4, 12) at patch 8 share voxel centres 4..7.
  f1, f2 = views.box_overlap_fractions([0.0], [8.0], [4.0], [8.0], (8,))
  assert (f1, f2) == (0.5, 0.5)
  # Boxes [0, 4) and [0, 8) at patch 4: centres 0..3 and 0.5, 2.5, 4.5, 6.5. Matches
  # must fall inside the other view's centre range: 3 of 4 and 2 of 4 per axis.
  f1, f2 = views.box_overlap_fractions([0.0, 0.0], [4.0, 4.0], [0.0, 0.0], [8.0, 8.0], (4, 4))
  assert f1 == pytest.approx(9 / 16) and f2 == pytest.approx(4 / 16)


@pytest.mark.parametrize('ndim', [2, 3])
def test_small_volume_is_padded_with_air(ndim):
  cfg = _cfg(ndim)
  shape = views.patch_shape(cfg)
  volume = np.full((10, 12, 6), 100, np.int16)
  pair = views.sample_view_pair(volume, np.random.default_rng(0), cfg, WINDOW)
  for view in (pair.view1, pair.view2):
    assert view.shape == shape
    assert np.any(view == WINDOW[0])  # Padding is air.
    assert np.any(view == 100.0)      # The volume is inside the view.
    assert view.min() >= WINDOW[0] and view.max() <= 100.0


def test_non_square_axial_patch_turns_only_by_half():
  cfg = _cfg(2, patch=(16, 8))
  volume = _random_volume(4)
  for seed in range(12):
    pair = views.sample_view_pair(volume, np.random.default_rng(seed), cfg, WINDOW)
    for t in (pair.transform1, pair.transform2):
      assert t[0, 1] == 0 and t[1, 0] == 0  # No axis swap.
    assert pair.view1.shape == (16, 8)


def test_sampling_is_seeded():
  cfg = _cfg(3)
  volume = _random_volume(5)
  a = views.sample_view_pair(volume, np.random.default_rng(7), cfg, WINDOW)
  b = views.sample_view_pair(volume, np.random.default_rng(7), cfg, WINDOW)
  c = views.sample_view_pair(volume, np.random.default_rng(8), cfg, WINDOW)
  for x, y in zip(a[:4], b[:4]):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.transform1, c.transform1)


def test_two_d_prefers_slices_with_body():
  volume = np.full((40, 40, 24), WINDOW[0], np.int16)
  volume[10:30, 10:30, 5:8] = 40  # Body only in slices 5..7.
  cfg = _cfg(2)
  slices = {views.sample_view_pair(volume, np.random.default_rng(s), cfg, WINDOW).slice_index
            for s in range(20)}
  assert slices <= {5, 6, 7} and len(slices) > 1


def test_bad_config_is_named():
  cfg = _cfg(3)
  cfg.patch_size = (16, 16)
  with pytest.raises(ValueError, match='patch_size'):
    views.patch_shape(cfg)
  cfg = _cfg(2, scale_range=(1.4, 0.7))
  with pytest.raises(ValueError, match='scale_range'):
    views.sample_view_pair(_random_volume(), np.random.default_rng(0), cfg, WINDOW)
  cfg = _cfg(2, min_overlap=1.5)
  with pytest.raises(ValueError, match='min_overlap'):
    views.sample_view_pair(_random_volume(), np.random.default_rng(0), cfg, WINDOW)


def test_scale_hu_and_disabled_augmentation():
  hu = np.array([-1000.0, -175.0, 37.5, 250.0, 900.0], np.float32)
  np.testing.assert_allclose(intensity.scale_hu(hu, WINDOW), [0.0, 0.0, 0.5, 1.0, 1.0])
  cfg = _cfg(2)
  out = intensity.augment_intensity(hu, np.random.default_rng(0), cfg.intensity, WINDOW)
  np.testing.assert_array_equal(out, intensity.scale_hu(hu, WINDOW))
  with pytest.raises(ValueError, match='HU window'):
    intensity.scale_hu(hu, (10, 10))


def test_intensity_augmentation_changes_values_deterministically():
  cfg = _cfg(3, enabled=True)
  cfg.intensity.prob = 1.0
  hu = _random_volume(6, (8, 8, 8)).astype(np.float32)
  a = intensity.augment_intensity(hu, np.random.default_rng(0), cfg.intensity, WINDOW)
  b = intensity.augment_intensity(hu, np.random.default_rng(0), cfg.intensity, WINDOW)
  plain = intensity.scale_hu(hu, WINDOW)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.float32 and a.shape == hu.shape and np.all(np.isfinite(a))
  assert np.abs(a - plain).mean() > 0.01
  # Blur lowers the voxel-to-voxel variation of white noise.
  assert np.abs(np.diff(a, axis=0)).mean() < np.abs(np.diff(plain, axis=0)).mean()
  # prob = 0 leaves plain windowing.
  cfg.intensity.prob = 0.0
  np.testing.assert_array_equal(
      intensity.augment_intensity(hu, np.random.default_rng(0), cfg.intensity, WINDOW), plain)


@pytest.mark.parametrize('ndim', [2, 3])
def test_pretrain_defaults_keep_left_and_right(ndim):
  """configs/pretrain.py: no flips, no quarter turns, so x (left-right) stays x, unmirrored."""
  from pixssl_jax import config_files  # Imported here: only this test reads the presets.
  data = config_files.load('pretrain', 'demo').data
  assert not data.flip and not data.rot90
  cfg = _cfg(ndim, flip=data.flip, rot90=data.rot90)
  volume = _random_volume(6)
  for seed in range(8):
    pair = views.sample_view_pair(volume, np.random.default_rng(seed), cfg, WINDOW)
    for t in (pair.transform1, pair.transform2):
      a = t[:, :ndim]
      np.testing.assert_array_equal(a, np.diag(np.diag(a)))  # no axis swap
      assert np.all(np.diag(a) > 0)  # no mirroring


# Views of `_reference_cases` as this implementation renders them: (hard, ndim, seed, sha1 of the
# raw-HU views and transforms, mean of each augmented view, one augmented voxel). Default
# settings (hard=False) were recorded before the remap and the mask existed, so they pin the
# default views; hard=True turns on every intensity augmentation and the remap. The spatial part
# is float32 arithmetic without transcendental functions and is compared bit for bit; the
# intensities go through exp/power/gaussian_filter, whose last bit may differ between CPUs.
_REFERENCE = (
    (False, 2, 0, 'afac127da7a594d5', 0.435269, 0.424440, 0.340961),
    (False, 2, 1, '939ca507d0490923', 0.549118, 0.471089, 0.529170),
    (False, 2, 2, '2b7141adcd32922a', 0.502213, 0.493348, 0.241635),
    (False, 3, 0, '6fa9e76efe4b14b8', 0.671795, 0.499398, 0.813887),
    (False, 3, 1, '912088059aaaa192', 0.507163, 0.461850, 0.494549),
    (False, 3, 2, 'f452d2bdd4252279', 0.478672, 0.495275, 0.507661),
    (True, 2, 0, 'afac127da7a594d5', 0.857652, 0.162006, 0.969325),
    (True, 2, 1, '939ca507d0490923', 0.020932, 0.341640, 0.064033),
    (True, 2, 2, '2b7141adcd32922a', 0.467802, 0.231943, 0.276510),
    (True, 3, 0, '6fa9e76efe4b14b8', 0.689255, 0.577483, 0.599704),
    (True, 3, 1, '912088059aaaa192', 0.600760, 0.548080, 0.572188),
    (True, 3, 2, 'f452d2bdd4252279', 0.707657, 0.459414, 0.741110),
)


@pytest.mark.parametrize('hard,ndim,seed,digest,mean1,mean2,voxel', _REFERENCE)
def test_views_match_the_stored_reference(hard, ndim, seed, digest, mean1, mean2, voxel):
  import hashlib  # Only this test digests arrays.
  cfg = config_files.load('pretrain', 'demo').data  # The defaults, as a run gets them.
  cfg.ndim, cfg.patch_size = ndim, (24,) * ndim
  if hard:
    cfg.intensity.prob, cfg.intensity.remap_prob = 1.0, 1.0
  volume = np.random.default_rng(11).integers(-175, 251, (48, 44, 30)).astype(np.int16)
  rng = np.random.default_rng(seed)
  pair = views.sample_view_pair(volume, rng, cfg, WINDOW)
  raw = b''.join(np.ascontiguousarray(a).tobytes() for a in pair[:4])
  assert hashlib.sha1(raw).hexdigest()[:16] == digest
  a1 = intensity.augment_intensity(pair.view1, rng, cfg.intensity, WINDOW)
  a2 = intensity.augment_intensity(pair.view2, rng, cfg.intensity, WINDOW)
  np.testing.assert_allclose([a1.mean(), a2.mean(), a1.reshape(-1)[101]], [mean1, mean2, voxel],
                             atol=2e-6)


def _remap_only(nonmonotone_prob):
  cfg = _cfg(3, enabled=True)
  cfg.intensity.prob = 0.0  # Every other augmentation off: the output is the remap alone.
  cfg.intensity.remap_prob = 1.0
  cfg.intensity.remap_nonmonotone_prob = nonmonotone_prob
  return cfg.intensity


@pytest.mark.parametrize('nonmonotone_prob', [0.0, 1.0])
def test_remap_stays_in_range_and_is_seeded(nonmonotone_prob):
  hu = np.linspace(WINDOW[0], WINDOW[1], 2001, dtype=np.float32)
  cfg = _remap_only(nonmonotone_prob)
  for seed in range(20):
    out = intensity.augment_intensity(hu, np.random.default_rng(seed), cfg, WINDOW)
    again = intensity.augment_intensity(hu, np.random.default_rng(seed), cfg, WINDOW)
    np.testing.assert_array_equal(out, again)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    if nonmonotone_prob == 0.0:
      assert np.all(np.diff(out) >= 0)  # The order of intensities is kept...
      np.testing.assert_allclose([out[0], out[-1]], [0.0, 1.0], atol=1e-6)
    else:
      # ... or not, but the view keeps its full range.
      np.testing.assert_allclose([out.min(), out.max()], [0.0, 1.0], atol=2e-3)
  other = intensity.augment_intensity(hu, np.random.default_rng(99), cfg, WINDOW)
  assert np.abs(other - out).max() > 0.01


def test_nonmonotone_remap_can_reorder_two_intensities():
  # Two soft tissues 40 HU apart (e.g. liver and spleen in one phase).
  hu = np.array([60.0, 100.0], np.float32)
  reordered = {}
  for prob in (0.0, 1.0):
    cfg = _remap_only(prob)
    outs = [intensity.augment_intensity(hu, np.random.default_rng(s), cfg, WINDOW)
            for s in range(50)]
    reordered[prob] = sum(o[0] > o[1] for o in outs)
  assert reordered[0.0] == 0
  assert 5 <= reordered[1.0] <= 45  # Both orders occur.


def test_remap_off_draws_nothing():
  """remap_prob 0 (the default) leaves the random stream, so views stay as they were."""
  cfg = _cfg(3, enabled=True).intensity
  hu = _random_volume(8, (6, 6, 6)).astype(np.float32)
  rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
  a = intensity.augment_intensity(hu, rng_a, cfg, WINDOW)
  cfg.remap_nonmonotone_prob = 1.0  # Irrelevant while remap_prob is 0.
  b = intensity.augment_intensity(hu, rng_b, cfg, WINDOW)
  np.testing.assert_array_equal(a, b)
  assert rng_a.random() == rng_b.random()


@pytest.mark.parametrize('shape,patch', [((16, 16), 4), ((12, 10, 9), 4)])
def test_patch_mask_hides_whole_cells_in_the_asked_share(shape, patch):
  mask = views.patch_mask(shape, np.random.default_rng(0), 0.25, patch)
  assert mask.shape == shape and mask.dtype == bool
  cells = [-(-s // patch) for s in shape]
  coarse = mask[tuple(slice(0, None, patch) for _ in shape)]
  assert coarse.sum() == round(0.25 * np.prod(cells))
  # Every cell is all hidden or all shown.
  np.testing.assert_array_equal(
      mask, np.kron(coarse, np.ones((patch,) * len(shape), bool))[tuple(map(slice, shape))])
  np.testing.assert_array_equal(mask, views.patch_mask(shape, np.random.default_rng(0), 0.25,
                                                       patch))
  assert not np.array_equal(mask, views.patch_mask(shape, np.random.default_rng(1), 0.25, patch))
