"""Labelled random crops for fine-tuning: foreground oversampling, slice budgets, resizing.

`LabelledCrop` is the grain transform of `pipeline.finetune_loader`; it reads `image` and
`label` from a case store (docs/design.md, "The store").
"""
from typing import Any, Optional, Sequence

import grain
import ml_collections
import numpy as np

from pixssl_jax.data import intensity
from pixssl_jax.data import views

# Foreground coordinates kept per case for oversampling; a strided subset of a
# large organ is as good as all of it and bounds the per-worker cache.
_MAX_FOREGROUND_COORDS = 50_000


def labelled_slice_indices(label: np.ndarray, count: int) -> np.ndarray:
  """`count` axial slice indices evenly spaced over the z-range of a label's foreground.

  Slice i (of `count`) is the centre of the i-th of `count` equal parts of the range from the
  first to the last slice with a foreground voxel, so the slices cover the organs from top to
  bottom the way an annotator would pick them. Fewer come back when the range is shorter than
  `count`; a label without foreground spreads them over the whole volume.

  Args:
    label: `[X, Y, Z]` integer label volume.
    count: number of slices (> 0).

  Returns:
    Sorted, distinct int64 z indices.
  """
  if count < 1:
    raise ValueError(f'count must be positive, got {count}')
  occupied = np.flatnonzero(np.asarray(label).any(axis=(0, 1)))
  first, last = (occupied[0], occupied[-1]) if len(occupied) else (0, label.shape[2] - 1)
  span = last - first + 1
  centres = first + (np.arange(count) + 0.5) * span / count
  return np.unique(np.floor(centres).astype(np.int64))


class LabelledCrop(grain.transforms.RandomMap):
  """Case id -> one labelled random crop with class-balanced foreground oversampling.

  With probability `foreground_prob` the crop is centred on a voxel of a foreground class
  drawn uniformly among the classes present in the case, then a random voxel of that class
  (nnU-Net's sampling: small organs such as the kidneys or the aorta are seen as often as the
  liver; drawing voxels uniformly over all foreground would centre most crops on the largest
  organs). Otherwise the crop is placed uniformly. Volumes smaller than the patch are padded
  with air (image) and background (label). 2-D crops are axial slices.

  With `label_slices` = K > 0 (2-D only), each case contributes only K axial slices, evenly
  spaced over the z-range of its labelled voxels (`labelled_slice_indices`): the setting of an
  annotator who outlines a few slices of a scan. Crops are drawn from those slices only, so
  training never sees the labels of the others.

  `scale_range` (low, high) other than (1, 1) resizes each crop: a box of `s * P` voxels
  (`s` log-uniform in the range) with the same centre is resampled to `P`, the image
  linearly and the label by nearest voxel (no rotation, no mirroring). `intensity_cfg` (a
  `data.intensity` block) augments the image as pre-training's views are; None or
  `enabled=False` only windows it. Both off draw no random numbers, so the crops are those
  of a loader without them.
  """

  def __init__(self, store: Any, shape: tuple[int, ...], foreground_prob: float, flip: bool,
               label_slices: int = 0, *,
               intensity_cfg: Optional[ml_collections.ConfigDict] = None,
               scale_range: Optional[Sequence[float]] = None):
    if not 0.0 <= foreground_prob <= 1.0:
      raise ValueError(f'foreground_prob must be in [0, 1], got {foreground_prob}')
    if label_slices < 0:
      raise ValueError(f'label_slices must be >= 0, got {label_slices}')
    if label_slices and len(shape) != 2:
      # A 3-D crop spans unlabelled slices, whose voxels the loss would take as background.
      raise ValueError(f'label_slices={label_slices} needs 2-D crops (data.ndim=2); a 3-D crop '
                       'would train on the unlabelled slices between them as background')
    self._store = store
    self._shape = shape
    self._foreground_prob = foreground_prob
    self._flip = flip
    self._label_slices = int(label_slices)
    self._window = tuple(float(v) for v in store.hu_window)
    self._intensity = None if intensity_cfg is None else ml_collections.FrozenConfigDict(
        intensity_cfg)
    lo, hi = (1.0, 1.0) if scale_range is None else (float(v) for v in scale_range)
    if not 0 < lo <= hi:
      raise ValueError(f'scale_range must satisfy 0 < low <= high, got {scale_range}')
    self._scale_range = (lo, hi)
    self._foreground: dict[str, list[np.ndarray]] = {}
    self._slices: dict[str, np.ndarray] = {}

  def _labelled_slices(self, case_id: str, label: np.ndarray) -> np.ndarray:
    """The axial slices (z indices) of the case whose labels training may see."""
    if case_id not in self._slices:
      self._slices[case_id] = labelled_slice_indices(np.asarray(label), self._label_slices)
    return self._slices[case_id]

  def _foreground_coords(self, case_id: str, label: np.ndarray) -> list[np.ndarray]:
    """Per foreground class present in the case, (a subsample of) its voxel coordinates."""
    if case_id not in self._foreground:
      label = np.asarray(label)
      per_class = []
      for value in np.unique(label):
        if value == 0:
          continue
        coords = np.argwhere(label == value).astype(np.int32)
        if self._label_slices:
          coords = coords[np.isin(coords[:, 2], self._labelled_slices(case_id, label))]
          if not len(coords):
            continue  # The class is not on the labelled slices.
        stride = -(-len(coords) // _MAX_FOREGROUND_COORDS)
        per_class.append(coords[::max(stride, 1)])
      self._foreground[case_id] = per_class
    return self._foreground[case_id]

  def random_map(self, case_id: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = self._store.image(case_id), self._store.label(case_id)
    if image.shape != label.shape:
      raise ValueError(f'case {case_id!r}: image {image.shape} and label {label.shape} differ')
    n = len(self._shape)
    p = np.asarray(self._shape)
    vol = np.asarray(image.shape)
    foreground = self._foreground_coords(case_id, label)
    if foreground and rng.random() < self._foreground_prob:
      coords = foreground[rng.integers(len(foreground))]
      centre = coords[rng.integers(len(coords))]
      start3 = np.concatenate([centre[:n] - p // 2, centre[n:]])
    else:
      # Uniform start; negative when the volume is smaller (padding both sides).
      slack = vol[:n] - p
      start = rng.integers(np.minimum(slack, 0), np.maximum(slack, 0) + 1)
      if n == 3:
        start3 = start
      elif self._label_slices:
        start3 = np.concatenate([start, [rng.choice(self._labelled_slices(case_id, label))]])
      else:
        start3 = np.concatenate([start, [rng.integers(vol[2])]])
    if self._scale_range == (1.0, 1.0):
      size3 = np.concatenate([p, np.ones(3 - n, np.int64)])
      img = views.extract_padded(image, start3, size3, self._window[0]).reshape(self._shape)
      lab = views.extract_padded(label, start3, size3, 0).reshape(self._shape)
    else:
      img, lab = self._resized_crop(image, label, start3, rng)
    if self._flip:
      axes = tuple(np.flatnonzero(rng.random(n) < 0.5))
      if axes:
        img, lab = np.flip(img, axes), np.flip(lab, axes)
    if self._intensity is None:
      img = intensity.scale_hu(img, self._window)
    else:
      img = intensity.augment_intensity(img, rng, self._intensity, self._window)
    return {
        'image': img[..., None],
        'label': np.ascontiguousarray(lab, dtype=np.int32),
    }

  def _resized_crop(self, image, label, start3: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The crop at `start3` resized by a random scale about its centre: HU image, labels."""
    n = len(self._shape)
    p = np.asarray(self._shape, np.float64)
    lo, hi = self._scale_range
    size = p * np.exp(rng.uniform(np.log(lo), np.log(hi)))
    # Same centre as the unscaled box, so foreground-centred crops stay centred.
    start = start3[:n] + 0.5 * (p - size)
    transform = views.crop_transform(start, size, self._shape)
    if n == 2:
      image, label = image[:, :, int(start3[2])], label[:, :, int(start3[2])]
    return (views.render_view(image, transform, self._shape, self._window[0]),
            views.render_labels(label, transform, self._shape, 0))
