"""Tests of the loss functions: exact arithmetic, transform-based matching, MC statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax import losses


# ---------------------------------------------------------------- view transforms built by hand


def _view_transform(n, size, offset, flips=(), rot90=False, scale=1.0):
  """`[n, n+1]` transform of a view: optional rot90 (axes 0, 1), flips, crop offset and resize.

  view index i -> crop-local index `local = M i + c` (signed permutation), then the design's
  resize convention `src = o + (local + 0.5) * scale - 0.5`.
  """
  m = np.eye(n)
  c = np.zeros(n)
  if rot90:  # local = (P-1 - i1, i0, ...)
    r = np.eye(n)
    r[:2, :2] = [[0, -1], [1, 0]]
    m, c = r @ m, r @ c + np.r_[size - 1, 0, np.zeros(n - 2)]
  for k in flips:
    f = np.eye(n)
    f[k, k] = -1
    shift = np.zeros(n)
    shift[k] = size - 1
    m, c = f @ m, f @ c + shift
  a = scale * m
  b = scale * c + 0.5 * scale - 0.5 + np.asarray(offset, np.float64)
  return np.concatenate([a, b[:, None]], axis=1).astype(np.float32)


def _cell_source_coords(t, grid, stride):
  """Source-frame coordinates `[*G, n]` of a view's feature-cell centres (forward mapping)."""
  n = len(grid)
  cells = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing='ij'), -1)
  centres = stride * cells + (stride - 1) / 2.0
  return centres @ t[:, :n].astype(np.float64).T + t[:, n]


_CASES_2D = [
    # (view1 kwargs, view2 kwargs)
    (dict(offset=(0, 0)), dict(offset=(3, 2), flips=(0,))),
    (dict(offset=(1, 2), rot90=True), dict(offset=(4, 0), flips=(1,))),
    (dict(offset=(2, 1), flips=(0, 1)), dict(offset=(0, 3), rot90=True, flips=(0,))),
    (dict(offset=(0, 0), scale=2.0), dict(offset=(2, 3), rot90=True)),
]
_CASES_3D = [
    (dict(offset=(0, 0, 0)), dict(offset=(2, 1, 3), flips=(2,))),
    (dict(offset=(1, 0, 2), rot90=True, flips=(2,)), dict(offset=(0, 2, 0), flips=(0, 1))),
    (dict(offset=(0, 0, 0), scale=1.5), dict(offset=(1, 3, 2), rot90=True)),
]


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('ndim,cases', [(2, _CASES_2D), (3, _CASES_3D)])
def test_match_features_aligns_affine_features(ndim, cases, stride):
  """Teacher features = affine function of source coordinates; matching must recover it."""
  size = 8
  grid = (size // stride,) * ndim
  rng = np.random.default_rng(ndim * 10 + stride)
  w = rng.normal(scale=0.1, size=(3, ndim))  # 3 channels, each affine in the source coordinate
  v = rng.normal(size=3)
  t1 = np.stack([_view_transform(ndim, size, **kw1) for kw1, _ in cases])
  t2 = np.stack([_view_transform(ndim, size, **kw2) for _, kw2 in cases])
  src2 = np.stack([_cell_source_coords(t, grid, stride) for t in t2])
  src1 = np.stack([_cell_source_coords(t, grid, stride) for t in t1])
  teacher_view2 = (src2 @ w.T + v).astype(np.float32)
  expected = src1 @ w.T + v

  matched, valid = losses.match_features(jnp.asarray(teacher_view2), jnp.asarray(t1),
                                         jnp.asarray(t2), stride)
  matched, valid = np.asarray(matched), np.asarray(valid)

  # The geometric overlap: view-1 cell centres inside the hull of view-2 cell centres.
  lo = src2.reshape(len(cases), -1, ndim).min(1)
  hi = src2.reshape(len(cases), -1, ndim).max(1)
  bshape = (len(cases),) + (1,) * ndim + (ndim,)
  expected_valid = np.all((src1 >= lo.reshape(bshape) - 1e-6)
                          & (src1 <= hi.reshape(bshape) + 1e-6), axis=-1)
  np.testing.assert_array_equal(valid, expected_valid)
  assert valid.dtype == bool
  fractions = valid.reshape(len(cases), -1).mean(1)
  assert np.all(fractions > 0) and np.any(fractions < 1)  # partial overlaps are exercised
  np.testing.assert_allclose(matched[valid], expected[valid], atol=1e-5)


def test_match_features_rejects_bad_transform_shape():
  feats = jnp.zeros((2, 4, 4, 3))
  good = jnp.zeros((2, 2, 3))
  with pytest.raises(ValueError, match='transform_dst'):
    losses.match_features(feats, good, jnp.zeros((2, 3, 4)), 1)


def test_linear_interpolate_matches_map_coordinates():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  coords = rng.uniform([0, 0], [4, 5], size=(2, 7, 2)).astype(np.float32)
  out = np.asarray(losses.linear_interpolate(jnp.asarray(feats), jnp.asarray(coords)))
  for b, c in itertools.product(range(2), range(3)):
    ref = jax.scipy.ndimage.map_coordinates(feats[b, ..., c], list(coords[b].T), order=1)
    np.testing.assert_allclose(out[b, :, c], np.asarray(ref), atol=1e-5)


def test_match_by_distance_finds_the_aligned_cell():
  """Views shifted by whole cells: each valid cell has exactly its partner within 0.7 diag."""
  stride, size = 2, 8
  t1 = _view_transform(2, size, offset=(0, 0))[None]
  t2 = _view_transform(2, size, offset=(2, 4))[None]  # one and two cells
  feats = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 5)), jnp.float32)
  matched, valid = losses.match_features_by_distance(feats, jnp.asarray(t1), jnp.asarray(t2),
                                                     stride)
  exact, exact_valid = losses.match_features(feats, jnp.asarray(t1), jnp.asarray(t2), stride)
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(exact_valid))
  assert float(np.mean(valid)) == pytest.approx(3 / 4 * 2 / 4)
  normalised = np.asarray(losses.l2_normalize(exact))
  np.testing.assert_allclose(np.asarray(matched)[np.asarray(valid)],
                             normalised[np.asarray(valid)], atol=1e-6)


# ----------------------------------------------------------------------- exact loss arithmetic


def test_cosine_discrepancy_values_and_safety():
  a = jnp.array([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0], [1.0, 0.0]])
  b = jnp.array([[0.0, 3.0], [5.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
  np.testing.assert_allclose(losses.cosine_discrepancy(a, b), [2.0, 0.0, 0.0, 4.0], atol=1e-6)
  grad = jax.grad(lambda x: losses.cosine_discrepancy(x, jnp.ones(3)))(jnp.zeros(3))
  assert float(losses.cosine_discrepancy(jnp.zeros(3), jnp.ones(3))) == pytest.approx(2.0)
  assert np.all(np.isfinite(grad))


def test_global_consistency_is_symmetrised_byol():
  e0, e1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
  pred1 = jnp.stack([e0, e0])
  pred2 = jnp.stack([e0, e1])
  target1 = jnp.stack([e0, -e1])
  target2 = jnp.stack([e1, e0])
  # sample 0: d(e0, e1) = 2, d(e0, e0) = 0 -> 1; sample 1: d(e0, e0) = 0, d(e1, -e1) = 4 -> 2.
  assert float(losses.global_consistency(pred1, pred2, target1, target2)) == pytest.approx(1.5)


def test_weighted_pixel_loss_forms_by_hand():
  tau, eps = 0.5, 0.01
  d = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  valid = jnp.array([[True, True, True, False]])
  # 'exp': u = tau * ln(1, 2, 4) gives weights 1, 1/2, 1/4.
  u = jnp.array([[0.0, tau * np.log(2.0), tau * np.log(4.0), 0.0]])
  got = losses.weighted_pixel_loss(d, valid, u, form='exp', tau=tau)
  assert float(got) == pytest.approx((1 + 0.5 * 2 + 0.25 * 3) / 1.75, rel=1e-6)
  # 'kendall': u + eps = 1, e, e^2 -> s = 0, 1, 2.
  uk = jnp.array([[1.0, np.e, np.e ** 2, 5.0]]) - eps
  got = losses.weighted_pixel_loss(d, valid, uk, form='kendall', eps=eps)
  expected = ((1.0 + 0.0) + (2.0 / np.e + 1.0) + (3.0 / np.e ** 2 + 2.0)) / 3
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # 'threshold': only u < t counts (pixels 0 and 1).
  got = losses.weighted_pixel_loss(d, valid, u, form='threshold', threshold=0.5)
  assert float(got) == pytest.approx(1.5)
  got = losses.weighted_pixel_loss(d, valid, u, form='none')
  assert float(got) == pytest.approx(2.0)


@pytest.mark.parametrize('form', losses.WEIGHTING_FORMS)
def test_weighted_pixel_loss_no_valid_pixel_is_zero_not_nan(form):
  d, u = jnp.ones((2, 3)), jnp.full((2, 3), 0.1)
  valid = jnp.zeros((2, 3), bool)

  def f(d, u):
    return losses.weighted_pixel_loss(d, valid, u, form=form, tau=0.1, eps=1e-3, threshold=1.0)

  assert float(f(d, u)) == 0.0
  gd, gu = jax.grad(f, argnums=(0, 1))(d, u)
  assert np.all(np.asarray(gd) == 0) and np.all(np.asarray(gu) == 0)


def test_weighted_pixel_loss_rejects_unknown_form():
  with pytest.raises(ValueError, match='weighting'):
    losses.weighted_pixel_loss(jnp.ones(2), jnp.ones(2), jnp.ones(2), form='softmax')


def test_exp_weights_carry_no_gradient():
  d, valid = jnp.array([1.0, 3.0]), jnp.array([True, True])
  g = jax.grad(lambda u: losses.weighted_pixel_loss(d, valid, u, form='exp', tau=1.0))(
      jnp.array([0.1, 0.2]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0])


def test_mc_dropout_statistics_by_hand():
  # K=2, B=1, G=(2,), C=2. Pixel 0: directions e0 and e1 -> per-channel var 1/4 -> 1/4.
  # Pixel 1: the same direction at two lengths -> 0 after normalisation.
  samples = jnp.array([[[[1.0, 0.0], [1.0, 1.0]]],
                       [[[0.0, 2.0], [3.0, 3.0]]]])
  mean, var = losses.mc_dropout_statistics(samples)
  assert mean.shape == (1, 2, 2) and var.shape == (1, 2)
  np.testing.assert_allclose(mean, [[[0.5, 1.0], [2.0, 2.0]]])
  np.testing.assert_allclose(var, [[0.25, 0.0]], atol=1e-7)
  _, var1 = losses.mc_dropout_statistics(samples[:1])
  np.testing.assert_array_equal(np.asarray(var1), 0.0)


def test_ramp_threshold_endpoints():
  assert float(losses.ramp_threshold(0, 100, 0.1, 0.3)) == pytest.approx(
      0.1 + 0.2 * np.exp(-5.0), rel=1e-6)
  assert float(losses.ramp_threshold(100, 100, 0.1, 0.3)) == pytest.approx(0.3)
  assert float(losses.ramp_threshold(500, 100, 0.1, 0.3)) == pytest.approx(0.3)
  mid = float(losses.ramp_threshold(jnp.array(50), 100, 0.1, 0.3))
  assert 0.1 < mid < 0.3
