"""Dice and HD95 on analytic cases, empty-mask rules, summaries and the metric files."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import distance

from pixssl_jax.evaluation import metrics


def _cube(shape, start, size):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(s, s + size) for s in start)] = True
  return mask


def _sphere(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  return np.linalg.norm((idx - np.asarray(centre)) * spacing, axis=-1) <= radius


def _reference_hd95(a, b, spacing):
  """Independent brute force: boundary by explicit 6-neighbour test, all pairwise distances."""
  def boundary_points(mask):
    padded = np.pad(mask, 1)
    interior = padded.copy()
    for axis in range(mask.ndim):
      for shift in (-1, 1):
        interior &= np.roll(padded, shift, axis)
    edge = (padded & ~interior)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(edge) * np.asarray(spacing)
  pa, pb = boundary_points(a), boundary_points(b)
  d = distance.cdist(pa, pb)
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize('axis,offset,spacing', [
    (0, 3, (1.0, 1.0, 1.0)),
    (2, 3, (0.8, 0.7, 2.5)),   # Offset along the coarse axis: 3 voxels = 7.5 mm.
    (1, 2, (0.8, 1.7, 2.5)),
])
def test_hd95_of_offset_cubes_is_the_offset_in_mm(axis, offset, spacing):
  shape, size = (24, 24, 24), 8
  start = [6, 6, 6]
  a = _cube(shape, start, size)
  start[axis] += offset
  b = _cube(shape, start, size)
  # The leading face of each cube (1/6 of its boundary, > 5%) is exactly `offset` voxels from
  # the other cube's boundary along `axis`, and no boundary voxel is farther.
  assert metrics.hd95(a, b, spacing) == pytest.approx(offset * spacing[axis], abs=1e-9)
  assert metrics.hd95(b, a, spacing) == pytest.approx(offset * spacing[axis], abs=1e-9)
  assert metrics.dice(a, b) == pytest.approx((size - offset) / size)


def test_hd95_of_concentric_spheres_is_the_radius_gap():
  shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
  small = _sphere(shape, (20, 20, 20), 8.0)
  big = _sphere(shape, (20, 20, 20), 13.0)
  # Voxelised shells: the gap is 5 mm give or take the voxel staircase.
  assert metrics.hd95(small, big, spacing) == pytest.approx(5.0, abs=1.0)
  assert metrics.dice(small, big) == pytest.approx(
      2 * small.sum() / (small.sum() + big.sum()))


def test_hd95_matches_brute_force_on_irregular_shapes_with_anisotropic_spacing():
  rng = np.random.default_rng(0)
  shape, spacing = (18, 16, 10), (0.9, 1.3, 2.7)
  blobs = [ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05 for _ in range(2)]
  # Masks touching the array border exercise "outside is background" too.
  expected = _reference_hd95(blobs[0], blobs[1], spacing)
  assert expected > 1.0
  assert metrics.hd95(blobs[0], blobs[1], spacing) == pytest.approx(expected, rel=1e-9)


def test_single_voxel_objects():
  shape, spacing = (10, 12, 14), (1.5, 1.0, 2.0)
  a = np.zeros(shape, bool)
  b = np.zeros(shape, bool)
  a[2, 3, 4] = True
  b[5, 7, 4] = True
  assert metrics.hd95(a, b, spacing) == pytest.approx(math.hypot(3 * 1.5, 4 * 1.0))
  assert metrics.dice(a, b) == 0.0
  assert metrics.hd95(a, a, spacing) == 0.0
  assert metrics.dice(a, a) == 1.0


def test_identical_masks_give_dice_one_and_zero_distance():
  mask = _sphere((20, 20, 20), (9.5, 10, 8), 6.0)
  assert metrics.dice(mask, mask) == 1.0
  assert metrics.hd95(mask, mask, (0.7, 0.7, 3.0)) == 0.0


def test_two_dimensional_masks():
  a = _cube((20, 20), (3, 3), 6)
  b = _cube((20, 20), (3, 7), 6)
  assert metrics.hd95(a, b, (0.5, 2.0)) == pytest.approx(8.0)


def test_empty_masks():
  shape, spacing = (10, 20, 30), (2.0, 1.0, 0.5)
  empty = np.zeros(shape, bool)
  mask = _cube(shape, (2, 2, 2), 3)
  assert math.isnan(metrics.dice(empty, empty))
  assert math.isnan(metrics.hd95(empty, empty, spacing))
  assert metrics.pair_status(empty, empty) == metrics.STATUS_EXCLUDED
  penalty = math.sqrt(20.0**2 + 20.0**2 + 15.0**2)
  assert metrics.failure_penalty(shape, spacing) == pytest.approx(penalty)
  for pred, true in ((empty, mask), (mask, empty)):
    assert metrics.dice(pred, true) == 0.0
    assert metrics.hd95(pred, true, spacing) == pytest.approx(penalty)
    assert metrics.pair_status(pred, true) == metrics.STATUS_FAILURE


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='shape'):
    metrics.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
  with pytest.raises(ValueError, match='spacing'):
    metrics.hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))
  with pytest.raises(ValueError, match='positive'):
    metrics.hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match='status'):
    metrics.summarize([{'case_id': 'a', 'organ': 'x', 'dice': 1.0, 'hd95': 0.0,
                        'status': 'great'}])


def test_case_metrics_summary_and_files(tmp_path):
  shape, spacing = (16, 16, 16), (1.0, 1.0, 2.0)
  names = {0: 'background', 1: 'liver', 2: 'spleen', 3: 'kidney'}
  true = np.zeros(shape, np.uint8)
  true[2:8, 2:8, 2:8] = 1
  true[10:14, 10:14, 10:14] = 2
  pred = np.zeros(shape, np.uint8)
  pred[2:8, 2:8, 3:9] = 1            # Liver shifted one voxel in z: Dice 5/6, HD95 2 mm.
  pred[1:3, 1:3, 12:14] = 3          # Spleen missed, kidney hallucinated.
  case_a = metrics.case_metrics(pred, true, spacing, names)
  assert list(case_a) == ['liver', 'spleen', 'kidney']
  assert case_a['liver']['dice'] == pytest.approx(5 / 6)
  assert case_a['liver']['hd95'] == pytest.approx(2.0)
  assert case_a['liver']['status'] == 'ok'
  penalty = metrics.failure_penalty(shape, spacing)
  for organ in ('spleen', 'kidney'):
    assert case_a[organ] == {'dice': 0.0, 'hd95': pytest.approx(penalty), 'status': 'failure'}
  case_b = metrics.case_metrics(true, true, spacing, names)   # Perfect; kidney absent in both.
  assert math.isnan(case_b['kidney']['dice']) and case_b['kidney']['status'] == 'excluded'

  rows = metrics.case_rows('a', case_a) + metrics.case_rows('b', case_b)
  table = {r['organ']: r for r in metrics.summarize(rows)}
  assert table['liver']['dice_mean'] == pytest.approx((5 / 6 + 1) / 2)
  assert table['liver']['dice_std'] == pytest.approx((1 - 5 / 6) / 2)
  assert table['liver']['hd95_mean'] == pytest.approx(1.0)
  assert table['spleen']['failures'] == 1 and table['spleen']['n'] == 2
  assert table['kidney']['n'] == 1 and table['kidney']['excluded'] == 1
  assert table['kidney']['hd95_mean'] == pytest.approx(penalty)
  overall = table['mean']
  case_a_dice = (5 / 6 + 0 + 0) / 3
  assert overall['dice_mean'] == pytest.approx((case_a_dice + 1.0) / 2)
  assert overall['hd95_mean'] == pytest.approx(((2.0 + 2 * penalty) / 3 + 0.0) / 2)
  assert (overall['n'], overall['failures'], overall['excluded']) == (2, 2, 1)
  text = metrics.format_table(list(table.values()))
  assert 'liver' in text and '91.67' in text

  csv_path, json_path = metrics.write_metrics(str(tmp_path / 'work'), rows,
                                              extra={'step': 7})
  with open(csv_path) as f:
    read = list(csv.DictReader(f))
  assert [r['organ'] for r in read] == ['liver', 'spleen', 'kidney', 'mean']
  assert float(read[0]['dice_mean']) == pytest.approx(table['liver']['dice_mean'])
  assert read[2]['dice_std'] == '0.0' and read[2]['failures'] == '1'
  with open(json_path) as f:
    payload = json.load(f)   # Strict JSON: NaN must have become null.
  assert payload['info'] == {'step': 7}
  kidney_b = [r for r in payload['cases'] if r['case_id'] == 'b' and r['organ'] == 'kidney']
  assert kidney_b[0]['dice'] is None and kidney_b[0]['status'] == 'excluded'
  assert sorted(p.name for p in (tmp_path / 'work').iterdir()) == ['metrics.csv',
                                                                   'metrics.json']
