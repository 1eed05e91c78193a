"""Two-view spatial sampling with exact view-to-source transforms (numpy/scipy only).

Every view of spatial shape `P` (`n = len(P)`, 2 or 3) is *defined* by an affine
`T` `[n, n + 1]` float32 that maps a view voxel index `i` to a continuous source
coordinate, `src = T[:, :n] @ i + T[:, n]` (docs/design.md, "The view transform").
The view is rendered by sampling the source there with linear interpolation, and
the source is taken to be surrounded by air, so crops may leave the volume.

A pair is built in four steps:
  1. a random region of about `region_scale * P` voxels inside the volume;
  2. two crop boxes inside the region (size `scale * P`, one isotropic scale per
     view from `scale_range`) whose matched-voxel fraction is at least
     `min_overlap` in both views (re-sampled, then pulled together if needed);
  3. a random flip per axis and a random quarter turn in the axial plane (0, 1),
     folded into `T`;
  4. rendering (`render.render_view`): an exact slicing path when `T` is an
     integer signed permutation with an integer offset (no rescale), a separable
     per-axis linear interpolation for other scaled permutations,
     `scipy.ndimage.affine_transform` for anything else (and as the reference in
     tests).

`patch_mask` draws the cells of a view hidden from the student (`data.mask_ratio`).

For 2-D (`ndim=2`) both views come from one axial slice, preferring slices that
contain body, and `T` is `[2, 3]` in the slice's `(x, y)`.
"""
from typing import NamedTuple, Optional, Sequence

import ml_collections
import numpy as np

from pixssl_jax.data.render import extract_padded  # noqa: F401  (re-exported: used by callers)
from pixssl_jax.data.render import render_labels  # noqa: F401
from pixssl_jax.data.render import render_view

# Slices are scored on a strided subsample: a body test does not need every voxel.
_BODY_STRIDE = 4
# Crop boxes are re-sampled this many times before being pulled together.
_MAX_OVERLAP_TRIES = 10
# Interpolation weights for pulling the second box towards the first, largest first.
_PULL_STEPS = (0.8, 0.6, 0.4, 0.2, 0.0)


def patch_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Returns the view shape P from `data_cfg.patch_size`, checked against `ndim`."""
  ndim = int(data_cfg.ndim)
  if ndim not in (2, 3):
    raise ValueError(f'data.ndim must be 2 or 3, got {ndim}')
  size = data_cfg.patch_size
  shape = (int(size),) * ndim if np.isscalar(size) else tuple(int(s) for s in size)
  if len(shape) != ndim or min(shape) < 1:
    raise ValueError(f'data.patch_size {size!r} does not give {ndim} positive sizes')
  return shape


class ViewPair(NamedTuple):
  """Two views of one source, in raw HU (float32), with their transforms.

  Attributes:
    view1, view2: `[*P]` float32 HU samples of the source.
    transform1, transform2: `[n, n + 1]` float32 view index -> source coordinate.
    slice_index: the axial slice both views were cut from (2-D), else None.
  """
  view1: np.ndarray
  view2: np.ndarray
  transform1: np.ndarray
  transform2: np.ndarray
  slice_index: Optional[int]


def patch_mask(shape: Sequence[int], rng: np.random.Generator, ratio: float,
               patch: int) -> np.ndarray:
  """A random `ratio` of the `patch`-sided cells of a view, as a voxel mask.

  The view is cut into cells of `patch` voxels per axis (the last cells cut off
  at the view's edge) and exactly `round(ratio * cells)` of them are chosen, so
  every view hides the same share.

  Args:
    shape: view shape P.
    rng: the only source of randomness.
    ratio: share of cells to choose, in [0, 1).
    patch: cell side in voxels (>= 1).

  Returns:
    `[*P]` bool, True on the chosen cells.
  """
  cells = [-(-int(s) // patch) for s in shape]
  count = int(np.prod(cells))
  chosen = np.zeros(count, bool)
  chosen[rng.choice(count, int(round(ratio * count)), replace=False)] = True
  grid = chosen.reshape(cells)
  for a in range(len(shape)):
    grid = np.repeat(grid, patch, axis=a)
  return np.ascontiguousarray(grid[tuple(slice(0, int(s)) for s in shape)])


def _homogeneous(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
  n = len(offset)
  h = np.eye(n + 1)
  h[:n, :n], h[:n, n] = linear, offset
  return h


def crop_transform(start: np.ndarray, size: np.ndarray, shape: Sequence[int],
                   flips: Sequence[bool] = (), rot_k: int = 0) -> np.ndarray:
  """Builds `T` for a crop box resized to `shape`, then flipped and turned.

  The view equals `np.rot90(np.flip(crop, flipped_axes), rot_k, axes=(0, 1))` of
  the resized crop. Voxel-centre convention per axis:
  `src = start + (j + 0.5) * size / P - 0.5` for crop-grid index `j`.

  Args:
    start: `[n]` float crop start in source voxels.
    size: `[n]` float crop size in source voxels.
    shape: view shape P; axes 0 and 1 must be equal if `rot_k` is odd.
    flips: per-axis flip flags (empty = none).
    rot_k: quarter turns in the axial plane (0, 1).

  Returns:
    `[n, n + 1]` float32 transform.
  """
  n = len(shape)
  p = np.asarray(shape, np.float64)
  zoom = np.asarray(size, np.float64) / p
  crop = _homogeneous(np.diag(zoom), np.asarray(start, np.float64) + 0.5 * zoom - 0.5)
  flip_m, flip_b = np.eye(n), np.zeros(n)
  for a, f in enumerate(flips):
    if f:
      flip_m[a, a], flip_b[a] = -1.0, p[a] - 1
  rot_k %= 4
  if rot_k % 2 and shape[0] != shape[1]:
    raise ValueError(f'odd rot90 needs a square axial patch, got {tuple(shape)}')
  # View index i -> pre-rotation index k, matching np.rot90(m, rot_k, axes=(0, 1)).
  rot_m, rot_b = np.eye(n), np.zeros(n)
  if rot_k == 1:
    rot_m[:2, :2], rot_b[1] = [[0, 1], [-1, 0]], p[0] - 1
  elif rot_k == 2:
    rot_m[:2, :2], rot_b[:2] = [[-1, 0], [0, -1]], p[:2] - 1
  elif rot_k == 3:
    rot_m[:2, :2], rot_b[0] = [[0, -1], [1, 0]], p[1] - 1
  total = crop @ _homogeneous(flip_m, flip_b) @ _homogeneous(rot_m, rot_b)
  return total[:n].astype(np.float32)


def box_overlap_fractions(start1, size1, start2, size2, shape) -> tuple[float, float]:
  """Fraction of each view's voxels whose source point lies inside the other view.

  Flips and turns do not move a view's voxel centres in the source, so the
  boxes decide the overlap; "inside" means within view-index range `[0, P - 1]`
  of the other view, the same mask the pixel loss uses.

  Args:
    start1, size1, start2, size2: `[n]` crop boxes in source voxels.
    shape: view shape P.

  Returns:
    (fraction of view 1 matched in view 2, fraction of view 2 matched in view 1).
  """
  def matched(sa, za, sb, zb):
    frac = 1.0
    for s, z, t, w, p in zip(sa, za, sb, zb, shape):
      centres = s + (np.arange(p) + 0.5) * z / p - 0.5
      lo, hi = t + 0.5 * w / p - 0.5, t + (p - 0.5) * w / p - 0.5
      frac *= np.count_nonzero((centres >= lo - 1e-6) & (centres <= hi + 1e-6)) / p
    return frac
  return matched(start1, size1, start2, size2), matched(start2, size2, start1, size1)


def _sample_boxes(rng: np.random.Generator, vol_shape: Sequence[int], shape: Sequence[int],
                  data_cfg: ml_collections.ConfigDict):
  """Samples a region and two crop boxes in it meeting `min_overlap`."""
  p = np.asarray(shape, np.float64)
  vol = np.asarray(vol_shape, np.float64)
  lo, hi = (1.0, 1.0) if data_cfg.scale_range is None else map(float, data_cfg.scale_range)
  if not 0 < lo <= hi:
    raise ValueError(f'data.scale_range must satisfy 0 < low <= high, got {data_cfg.scale_range}')
  # Without a resize the boxes stay on the integer grid, so rendering is exact slicing.
  integer = lo == hi == 1.0
  if integer:
    sizes = [p, p]
  else:
    sizes = [p * np.exp(rng.uniform(np.log(lo), np.log(hi))) for _ in range(2)]
  # The region holds both crops; it is capped by the volume unless a crop
  # itself is larger; then it sticks out of the volume at a random place (air).
  region = np.maximum(np.maximum(sizes[0], sizes[1]),
                      np.minimum(vol, np.ceil(float(data_cfg.region_scale) * p)))
  if integer:
    region = np.ceil(region)
  slack = vol - region
  region_start = np.where(slack >= 0, rng.uniform(0, np.maximum(slack, 0)),
                          rng.uniform(np.minimum(slack, 0), 0))
  if integer:
    region_start = np.floor(region_start)

  def place(size):
    s = region_start + rng.uniform(0.0, 1.0, len(p)) * (region - size)
    return np.floor(s) if integer else s

  min_overlap = float(data_cfg.min_overlap)
  if not 0.0 <= min_overlap <= 1.0:
    raise ValueError(f'data.min_overlap must be in [0, 1], got {min_overlap}')
  starts = [place(sizes[0]), place(sizes[1])]
  for _ in range(_MAX_OVERLAP_TRIES - 1):
    if min(box_overlap_fractions(starts[0], sizes[0], starts[1], sizes[1], shape)) >= min_overlap:
      return starts, sizes
    starts = [place(sizes[0]), place(sizes[1])]
  # Guaranteed construction: pull box 2 towards box 1 (at weight 0 they coincide,
  # overlap 1); convex combinations of in-region boxes stay in the region.
  for w in _PULL_STEPS:
    s2 = starts[0] + w * (starts[1] - starts[0])
    z2 = sizes[0] + w * (sizes[1] - sizes[0])
    if integer:
      s2 = np.round(s2)
    if min(box_overlap_fractions(starts[0], sizes[0], s2, z2, shape)) >= min_overlap:
      return [starts[0], s2], [sizes[0], z2]
  raise AssertionError('unreachable: identical boxes overlap fully')


def _pick_slice(volume: np.ndarray, rng: np.random.Generator, air_value: float,
                hu_window: Sequence[float], min_body_fraction: float) -> int:
  """Picks an axial slice, uniformly among slices with enough body (else any)."""
  lo, hi = float(hu_window[0]), float(hu_window[1])
  sub = np.asarray(volume[::_BODY_STRIDE, ::_BODY_STRIDE, :])
  body = (sub > air_value + 0.1 * (hi - lo)).mean(axis=(0, 1))
  candidates = np.flatnonzero(body >= min_body_fraction)
  if candidates.size == 0:
    return int(rng.integers(volume.shape[2]))
  return int(rng.choice(candidates))


def sample_view_pair(volume: np.ndarray, rng: np.random.Generator,
                     data_cfg: ml_collections.ConfigDict,
                     hu_window: Sequence[float]) -> ViewPair:
  """Samples two overlapping, independently flipped/turned views of one volume.

  Args:
    volume: `[X, Y, Z]` HU volume (int16 memory map or float), RAS.
    rng: the only source of randomness.
    data_cfg: the `data` config (ndim, patch_size, region_scale, min_overlap,
      scale_range, flip, rot90, min_body_fraction).
    hu_window: (low, high) HU of the store; low is the air value used for padding.

  Returns:
    A ViewPair of raw HU views `[*P]` float32 and transforms `[n, n + 1]`.
  """
  if volume.ndim != 3:
    raise ValueError(f'sample_view_pair expects an [X, Y, Z] volume, got shape {volume.shape}')
  shape = patch_shape(data_cfg)
  n = len(shape)
  air = float(hu_window[0])
  slice_index = None
  source = volume
  if n == 2:
    slice_index = _pick_slice(volume, rng, air, hu_window, float(data_cfg.min_body_fraction))
    source = volume[:, :, slice_index]
  starts, sizes = _sample_boxes(rng, source.shape, shape, data_cfg)
  square = shape[0] == shape[1]
  views, transforms = [], []
  for start, size in zip(starts, sizes):
    flips = rng.random(n) < 0.5 if data_cfg.flip else np.zeros(n, bool)
    rot_k = 0
    if data_cfg.rot90:
      rot_k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    t = crop_transform(start, size, shape, flips, rot_k)
    views.append(render_view(source, t, shape, air))
    transforms.append(t)
  return ViewPair(views[0], views[1], transforms[0], transforms[1], slice_index)
