"""Tests of the loss functions: exact arithmetic, transform-based matching, MC statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax import losses


def _weighted_loss(discrepancy, valid, uncertainty, **kwargs):
  """The loss alone of `losses.uncertainty_weighting` (same arguments)."""
  return losses.uncertainty_weighting(discrepancy, valid, uncertainty, **kwargs)[0]


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


def test_weighted_pixel_loss_absolute_forms_by_hand():
  tau, eps = 0.5, 0.01
  d = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  valid = jnp.array([[True, True, True, False]])
  # 'exp': u = tau * ln(1, 2, 4) gives weights 1, 1/2, 1/4.
  u = jnp.array([[0.0, tau * np.log(2.0), tau * np.log(4.0), 0.0]])
  got = _weighted_loss(d, valid, u, form='exp', scale='absolute', tau=tau)
  assert float(got) == pytest.approx((1 + 0.5 * 2 + 0.25 * 3) / 1.75, rel=1e-6)
  # 'kendall': u + eps = 1, e, e^2 -> s = 0, 1, 2.
  uk = jnp.array([[1.0, np.e, np.e ** 2, 5.0]]) - eps
  got = _weighted_loss(d, valid, uk, form='kendall', scale='absolute', eps=eps)
  expected = ((1.0 + 0.0) + (2.0 / np.e + 1.0) + (3.0 / np.e ** 2 + 2.0)) / 3
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # 'threshold': only u < t counts (pixels 0 and 1).
  got = _weighted_loss(d, valid, u, form='threshold', scale='absolute',
                                   threshold=0.5)
  assert float(got) == pytest.approx(1.5)
  got = _weighted_loss(d, valid, u, form='none')
  assert float(got) == pytest.approx(2.0)


def test_weighted_pixel_loss_relative_forms_by_hand():
  d = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  valid = jnp.array([[True, True, True, False]])
  # Valid u = 1, 2, 3: mean 2, std sqrt(2/3); the invalid pixel's u does not count.
  u = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  z = np.array([-1.0, 0.0, 1.0]) / np.sqrt(2.0 / 3.0)
  w = np.exp(-z / 2.0)
  got, weights = losses.uncertainty_weighting(d, valid, u, form='exp', tau=2.0)
  assert float(got) == pytest.approx(np.sum(w * [1, 2, 3]) / np.sum(w), rel=1e-5)
  np.testing.assert_allclose(weights, [list(w) + [0.0]], rtol=1e-5)
  # 'kendall': s = log(C u + eps) with C u + eps = 1, e, e^2.
  c, eps = 4, 0.01
  uk = (jnp.array([[1.0, np.e, np.e ** 2, 5.0]]) - eps) / c
  got = _weighted_loss(d, valid, uk, form='kendall', eps=eps, num_channels=c)
  expected = ((1.0 + 0.0) + (2.0 / np.e + 1.0) + (3.0 / np.e ** 2 + 2.0)) / 3
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # 'threshold': the 2/3 most certain valid pixels, u = 1 and 2.
  got = _weighted_loss(d, valid, u, form='threshold', keep_fraction=2 / 3)
  assert float(got) == pytest.approx(1.5)


@pytest.mark.parametrize('scale', losses.WEIGHTING_SCALES)
@pytest.mark.parametrize('form', losses.WEIGHTING_FORMS)
def test_weighted_pixel_loss_no_valid_pixel_is_zero_not_nan(form, scale):
  d, u = jnp.ones((2, 3)), jnp.full((2, 3), 0.1)
  valid = jnp.zeros((2, 3), bool)

  def f(d, u):
    return _weighted_loss(d, valid, u, form=form, scale=scale, tau=0.1, eps=1e-3,
                                      threshold=1.0, keep_fraction=0.5, num_channels=4)

  assert float(f(d, u)) == 0.0
  gd, gu = jax.grad(f, argnums=(0, 1))(d, u)
  assert np.all(np.asarray(gd) == 0) and np.all(np.asarray(gu) == 0)


def test_weighted_pixel_loss_rejects_unknown_form_and_scale():
  with pytest.raises(ValueError, match='weighting'):
    _weighted_loss(jnp.ones(2), jnp.ones(2), jnp.ones(2), form='softmax')
  with pytest.raises(ValueError, match='weighting_scale'):
    _weighted_loss(jnp.ones(2), jnp.ones(2), jnp.ones(2), form='exp', scale='log')


@pytest.mark.parametrize('scale', losses.WEIGHTING_SCALES)
def test_exp_weights_carry_no_gradient(scale):
  d, valid = jnp.array([1.0, 3.0]), jnp.array([True, True])
  g = jax.grad(lambda u: _weighted_loss(d, valid, u, form='exp', scale=scale,
                                                    tau=1.0))(jnp.array([0.1, 0.2]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0])


def _spread_out_uncertainty(shape=(4, 16, 16), seed=0):
  """Log-normal u around 1e-3 (the stabilizer's scale early in training), with 10% invalid."""
  rng = np.random.default_rng(seed)
  u = 1e-3 * np.exp(0.5 * rng.normal(size=shape))
  d = rng.uniform(0.2, 1.0, size=shape)
  valid = rng.random(shape) > 0.1
  return (jnp.asarray(d, jnp.float32), jnp.asarray(valid), jnp.asarray(u, jnp.float32))


def test_relative_exp_weights_are_far_from_uniform_at_any_scale():
  d, valid, u = _spread_out_uncertainty()
  loss, w = losses.uncertainty_weighting(d, valid, u, form='exp', tau=1.0)
  stats = losses.weight_statistics(w, valid)
  assert float(stats['weight_cv']) > 0.3 and float(stats['weight_ess']) < 0.9
  assert float(stats['keep_fraction']) == 1.0
  # Only u relative to the batch matters: u and 1000 u (or u / 100) give the same weights.
  for factor in (1000.0, 0.01):
    loss_s, w_s = losses.uncertainty_weighting(d, valid, factor * u, form='exp', tau=1.0)
    np.testing.assert_allclose(w_s, w, rtol=1e-4, atol=1e-7)
    assert float(loss_s) == pytest.approx(float(loss), rel=1e-5)
  # The absolute form at the old tau hardly weights the same batch.
  _, w_abs = losses.uncertainty_weighting(d, valid, u, form='exp', scale='absolute', tau=2e-3)
  assert float(losses.weight_statistics(w_abs, valid)['weight_ess']) > 0.9
  # Confident pixels weigh more.
  w, u = np.asarray(w), np.asarray(u)
  v = np.asarray(valid)
  assert w[v][np.argmin(u[v])] > w[v][np.argmax(u[v])]


@pytest.mark.parametrize('fraction', [0.25, 0.5, 0.9, 1.0])
def test_relative_threshold_keeps_the_asked_fraction_of_most_certain_pixels(fraction):
  d, valid, u = _spread_out_uncertainty()
  _, keep = losses.uncertainty_weighting(d, valid, u, form='threshold', keep_fraction=fraction)
  keep, v, u = np.asarray(keep) > 0, np.asarray(valid), np.asarray(u)
  assert not np.any(keep & ~v)
  assert keep.sum() == int(np.floor(fraction * v.sum() + 0.5))  # round half up
  if fraction < 1:
    assert u[keep].max() < u[v & ~keep].min()
  stats = losses.weight_statistics(keep.astype(np.float32), jnp.asarray(v))
  assert float(stats['keep_fraction']) == pytest.approx(fraction, abs=1 / v.sum())
  assert float(stats['weight_ess']) == pytest.approx(float(stats['keep_fraction']), rel=1e-6)


def test_relative_kendall_terms_are_order_one():
  """With s = log(C u + eps) both terms are O(1) for d ~ 0.3-1 at u's actual scale."""
  c = 64
  d, valid, u = _spread_out_uncertainty()  # C u ~ 0.06, as at initialisation
  v = np.asarray(valid)
  s = np.log(c * np.asarray(u) + 1e-3)[v]
  scaled = (np.asarray(d)[v] * np.exp(-s))
  assert 1 < np.mean(np.abs(s)) < 5 and 1 < np.mean(scaled) < 30
  loss = _weighted_loss(d, valid, u, form='kendall', eps=1e-3, num_channels=c)
  assert abs(float(loss)) < 30
  absolute = _weighted_loss(d, valid, u, form='kendall', scale='absolute', eps=1e-3)
  assert float(absolute) > 100  # the mis-scaled paper form on the same u
  # The gradient in log u pulls C u towards d: down where C u > d, up where C u < d.
  g = jax.grad(lambda x: _weighted_loss(
      d, valid, jnp.exp(x), form='kendall', eps=1e-3, num_channels=c))(jnp.log(u))
  g = np.asarray(g)[v]
  ratio = (c * np.asarray(u) / np.asarray(d))[v]
  assert np.all(g[ratio > 1.1] > 0) and np.all(g[ratio < 0.9] < 0)


def test_weight_statistics_by_hand():
  valid = jnp.array([True, True, True, True, False])
  uniform = losses.weight_statistics(jnp.full(5, 0.3), valid)
  assert float(uniform['weight_cv']) == pytest.approx(0.0, abs=1e-6)
  assert float(uniform['weight_ess']) == pytest.approx(1.0)
  assert float(uniform['keep_fraction']) == 1.0
  half = losses.weight_statistics(jnp.array([1.0, 1.0, 0.0, 0.0, 7.0]), valid)
  assert float(half['weight_ess']) == pytest.approx(0.5)
  assert float(half['weight_cv']) == pytest.approx(1.0)
  assert float(half['keep_fraction']) == 0.5
  none = losses.weight_statistics(jnp.ones(5), jnp.zeros(5, bool))
  assert all(float(v) == 0.0 for v in none.values())


def test_spearman_by_hand():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
  valid = jnp.asarray(rng.random((3, 50)) > 0.2)
  # Rank correlation: any increasing function gives 1, any decreasing one -1.
  assert float(losses.spearman(x, jnp.exp(3 * x), valid)) == pytest.approx(1.0, abs=1e-6)
  assert float(losses.spearman(x, -x ** 3, valid)) == pytest.approx(-1.0, abs=1e-6)
  # Invalid entries do not count, even when they break the monotone relation.
  y = jnp.where(valid, x, -x)
  assert float(losses.spearman(x, y, valid)) == pytest.approx(1.0, abs=1e-6)
  # Against numpy's rank correlation, on the subsample too.
  y = x + jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
  v = np.asarray(valid)
  rx = np.argsort(np.argsort(np.asarray(x)[v]))
  ry = np.argsort(np.argsort(np.asarray(y)[v]))
  assert float(losses.spearman(x, y, valid)) == pytest.approx(np.corrcoef(rx, ry)[0, 1],
                                                              abs=1e-5)
  sub = float(losses.spearman(x, y, valid, max_cells=60))  # every third entry
  xs, ys, vs = (np.asarray(a).reshape(-1)[::3] for a in (x, y, valid))
  rx, ry = np.argsort(np.argsort(xs[vs])), np.argsort(np.argsort(ys[vs]))
  assert sub == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-5)
  # A constant (u = 0 without MC dropout) has no correlation.
  assert float(losses.spearman(jnp.zeros((3, 50)), y, valid)) == 0.0


def test_uncertainty_calibration_is_one_minus_the_correlation_of_log_u_and_d():
  rng = np.random.default_rng(0)
  d = rng.random((4, 30)).astype(np.float32)
  valid = rng.random((4, 30)) > 0.2
  u = (1e-3 * np.exp(2 * d)).astype(np.float32)
  loss = float(losses.uncertainty_calibration(jnp.asarray(u), jnp.asarray(d), valid))
  # Pearson's correlation of log u with the rank of d among the valid cells.
  x = np.log(u + 0.1 * u[valid].mean())[valid]
  rank_d = np.argsort(np.argsort(d[valid]))
  assert loss == pytest.approx(1 - np.corrcoef(x, rank_d)[0, 1], abs=1e-5)
  assert loss < 0.05  # u rises with d: ordered alike.
  # Scale-free: the size of u does not matter, only its order; reversed order costs ~2.
  assert float(losses.uncertainty_calibration(jnp.asarray(u * 1e3), jnp.asarray(d), valid)
               ) == pytest.approx(loss, abs=1e-5)
  assert float(losses.uncertainty_calibration(jnp.asarray(1 / u), jnp.asarray(d), valid)) > 1.99
  # From a u unrelated to d, the gradient raises u where d is high and lowers it where d is
  # low; d gets none.
  u_noise = (1e-3 * (1 + 0.1 * rng.random((4, 30)))).astype(np.float32)
  g_u, g_d = jax.grad(losses.uncertainty_calibration, argnums=(0, 1))(
      jnp.asarray(u_noise), jnp.asarray(d), valid)
  g_u = np.asarray(g_u)
  assert np.corrcoef(-g_u[valid], d[valid])[0, 1] > 0.8
  assert np.all(g_u[~valid] == 0) and np.all(np.asarray(g_d) == 0)
  # Nothing to order (u all 0, or no valid cell): 1, with finite zero gradients.
  for u_, v_ in ((np.zeros_like(u), valid), (u, np.zeros_like(valid))):
    value, grad = jax.value_and_grad(losses.uncertainty_calibration)(
        jnp.asarray(u_), jnp.asarray(d), v_)
    assert float(value) == 1.0 and np.all(np.asarray(grad) == 0)


def test_valid_ranks_ignore_invalid_entries():
  x = jnp.array([5.0, -1.0, 3.0, 0.0])
  ranks = losses.valid_ranks(x, jnp.array([True, False, True, True]))
  np.testing.assert_array_equal(np.asarray(ranks)[[0, 2, 3]], [2, 1, 0])
  assert int(ranks[1]) >= 3


def test_effective_rank_of_isotropic_and_collapsed_features():
  rng = np.random.default_rng(0)
  isotropic = jnp.asarray(rng.normal(size=(2, 40, 40, 8)), jnp.float32)
  assert 7.5 < float(losses.effective_rank(isotropic)) <= 8.0
  line = jnp.asarray(rng.normal(size=(500, 1)) * rng.normal(size=(1, 8)) + 3.0, jnp.float32)
  assert float(losses.effective_rank(line)) == pytest.approx(1.0, abs=0.05)
  assert float(losses.effective_rank(jnp.ones((50, 8)))) == 0.0
  # Two equal directions: rank 2, also on a strided subsample.
  two = jnp.asarray(np.concatenate([rng.normal(size=(4000, 2)), np.zeros((4000, 6))], 1),
                    jnp.float32)
  assert float(losses.effective_rank(two, max_samples=1000)) == pytest.approx(2.0, abs=0.1)


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
