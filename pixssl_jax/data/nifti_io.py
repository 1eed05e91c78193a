"""Loads, validates, reorients and resamples one NIfTI CT case.

Every volume leaves this module RAS+ (axes increase towards Right, Anterior, Superior), at the
target spacing, as int16 HU clipped to the HU window; labels as uint8. The voxel-to-world
affine of the resampled grid is computed from the sampling itself, so a voxel centre keeps
its world position. Anything wrong with a file raises `CaseError(path, reason)`.
"""
import dataclasses
from collections.abc import Mapping, Sequence
import zlib

import nibabel as nib
from nibabel.openers import ImageOpener
import numpy as np
from scipy import ndimage

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
# Largest |value| accepted as HU. CT spans about -1024 (air) to a few 10^4 (dense metal on
# extended scales); anything past this is not HU (wrong scaling, raw counts, garbage) and
# clipping it to the window would hide the problem.
MAX_ABS_HU = 1e5


class CaseError(ValueError):
  """A raw case that cannot be used; `str()` is "path: reason"."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f'{self.path}: {reason}')


@dataclasses.dataclass(frozen=True)
class PreprocessedCase:
  """One case after preprocessing.

  Attributes:
    image: int16 HU `[X, Y, Z]`, RAS+, clipped to the HU window.
    label: uint8 `[X, Y, Z]` on the same grid, or None if the case has no label.
    spacing: voxel size in mm `(3,)` of `image` (the target spacing).
    affine: RAS voxel-to-world affine `[4, 4]` of `image`.
    original_affine: affine `[4, 4]` of the raw file as stored (any orientation).
    original_shape: raw image shape `(3,)`.
    original_spacing: raw voxel size in mm `(3,)`.
  """
  image: np.ndarray
  label: np.ndarray | None
  spacing: tuple[float, float, float]
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]
  original_spacing: tuple[float, float, float]


def is_nifti_name(name: str) -> bool:
  """Whether a file name ends in .nii or .nii.gz."""
  return name.endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
  """'case_1.nii.gz' -> 'case_1'."""
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _raw_pixdim(path, img: nib.Nifti1Image) -> np.ndarray:
  # nibabel silently replaces zero or negative pixdim on load (abs, 0 -> 1), which would hide
  # a broken header behind a wrong spacing; re-read the header unchecked to see the truth.
  with ImageOpener(str(path)) as f:
    header = type(img.header).from_fileobj(f, check=False)
  return np.asarray(header['pixdim'][1:4], np.float64)


def load_volume(path, what: str = 'image') -> tuple[nib.Nifti1Image, np.ndarray]:
  """Loads a 3-D NIfTI volume and checks its file, dimensions and geometry.

  Args:
    path: `.nii` or `.nii.gz` file.
    what: 'image' or 'label', used in error messages only.

  Returns:
    (img, data): the nibabel image (3-D; a 4-D file with a singleton last axis is squeezed)
    and its voxel array `[X, Y, Z]` (float32 for images, the stored dtype for labels).

  Raises:
    CaseError: not NIfTI, truncated, wrong number of dimensions, bad spacing or affine.
  """
  try:
    img = nib.load(str(path))
  except FileNotFoundError as e:
    raise CaseError(path, f'{what} file is missing') from e
  except Exception as e:  # nibabel raises ImageFileError, but also struct/OSError on junk.
    raise CaseError(path, f'not a readable NIfTI file ({type(e).__name__}: {e})') from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise CaseError(path, f'not a NIfTI file (nibabel reads it as {type(img).__name__})')
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    img = img.slicer[..., 0]
  elif len(shape) != 3:
    raise CaseError(path, f'{what} must be 3-D (or 4-D with a singleton last axis), '
                    f'got shape {tuple(shape)}')
  pixdim = _raw_pixdim(path, img)
  if np.any(pixdim <= 0) or not np.all(np.isfinite(pixdim)):
    raise CaseError(path, f'voxel spacing must be positive, header pixdim is {pixdim.tolist()}')
  affine = img.affine
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise CaseError(path, f'affine is singular or not finite: {np.round(affine, 4).tolist()}')
  try:
    if what == 'image':
      # A float64 value beyond float32's range becomes Inf here, which `_check_image` names;
      # numpy's overflow warning would only repeat it, in nibabel's words.
      with np.errstate(over='ignore'):
        data = img.get_fdata(dtype=np.float32)
    else:
      data = np.asanyarray(img.dataobj)
  except (EOFError, zlib.error, OSError, ValueError) as e:
    raise CaseError(path, f'truncated or corrupt file ({type(e).__name__}: {e})') from e
  return img, data


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm: lengths of the affine's columns."""
  return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def resample(volume: np.ndarray, affine: np.ndarray, spacing: Sequence[float],
             order: int) -> tuple[np.ndarray, np.ndarray]:
  """Resamples a volume to a new voxel spacing, keeping its field of view.

  The new grid covers the same extent: voxel edges are aligned, so new index `j` samples old
  index `i = (j + 0.5) * z - 0.5` with `z = new_spacing / old_spacing` per axis, and the new
  affine is `affine @ [[diag(z), 0.5 * z - 0.5], [0, 1]]`, which places every new voxel
  centre at the world position it was sampled from.

  Args:
    volume: `[X, Y, Z]` array.
    affine: its voxel-to-world affine `[4, 4]`.
    spacing: target voxel size in mm `(3,)`.
    order: spline order for `scipy.ndimage.affine_transform` (1 images, 0 labels).

  Returns:
    (resampled `[X', Y', Z']` with the input dtype, new affine `[4, 4]`).
  """
  old = np.asarray(spacing_of(affine))
  zoom = np.asarray(spacing, np.float64) / old
  shape = np.maximum(np.round(np.asarray(volume.shape) / zoom), 1).astype(int)
  offset = 0.5 * zoom - 0.5
  # A 1-D matrix tells scipy the transform is diagonal and takes its fast separable path.
  out = ndimage.affine_transform(volume, zoom, offset=offset, output_shape=tuple(shape),
                                 order=order, mode='nearest', prefilter=False)
  index_map = np.eye(4)
  index_map[:3, :3] = np.diag(zoom)
  index_map[:3, 3] = offset
  return out, affine @ index_map


def to_original_grid(volume: np.ndarray, affine: np.ndarray, original_affine: np.ndarray,
                     original_shape: Sequence[int], order: int = 0) -> np.ndarray:
  """Maps a volume on the store grid back onto the raw file's grid (e.g. predictions).

  Args:
    volume: `[X, Y, Z]` array on the store grid.
    affine: store (RAS, resampled) affine `[4, 4]`.
    original_affine: raw file affine `[4, 4]`.
    original_shape: raw shape `(3,)`.
    order: 0 (nearest) for label maps, 1 for intensities or probabilities.

  Returns:
    `[*original_shape]` array with the input dtype, to save with `original_affine`.
  """
  # original index -> world -> store index.
  index_map = np.linalg.inv(affine) @ original_affine
  return ndimage.affine_transform(volume, index_map[:3, :3], offset=index_map[:3, 3],
                                  output_shape=tuple(int(s) for s in original_shape),
                                  order=order, mode='nearest', prefilter=False)


def _check_image(path, data: np.ndarray) -> None:
  finite = np.isfinite(data)
  if not finite.all():
    raise CaseError(path, f'image has {int(data.size - finite.sum())} NaN or Inf voxels (or '
                    'values beyond the float32 range, which cannot be HU either)')
  lo, hi = float(data.min()), float(data.max())
  if max(-lo, hi) > MAX_ABS_HU:
    n = int(np.count_nonzero(np.abs(data) > MAX_ABS_HU))
    raise CaseError(path, f'image has {n} voxels outside +-{MAX_ABS_HU:g} (min {lo:g}, '
                    f'max {hi:g}), which cannot be HU; check the scaling (scl_slope/scl_inter)')
  if lo == hi:
    raise CaseError(path, f'image is constant (every voxel is {lo})')


def _check_label(path, img: nib.Nifti1Image, data: np.ndarray, image_img: nib.Nifti1Image,
                 label_names: Mapping[int, str] | None) -> np.ndarray:
  if img.shape != image_img.shape:
    raise CaseError(path, f'label shape {tuple(img.shape)} does not match image shape '
                    f'{tuple(image_img.shape)}')
  # Tolerate float noise from tools that re-save labels, not a different grid.
  if not np.allclose(img.affine, image_img.affine, atol=1e-3, rtol=0):
    raise CaseError(path, 'label affine does not match image affine: '
                    f'{np.round(img.affine, 4).tolist()} vs '
                    f'{np.round(image_img.affine, 4).tolist()}')
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
      raise CaseError(path, 'label has non-integer values (dtype '
                      f'{data.dtype}); labels must be whole class numbers')
  values = np.unique(data).astype(np.int64)
  allowed = set(label_names) if label_names is not None else set(range(256))
  bad = sorted(int(v) for v in values if int(v) not in allowed)
  if bad:
    where = 'dataset.json' if label_names is not None else 'the uint8 range'
    raise CaseError(path, f'label values {bad[:10]} are not in {where} '
                    f'(allowed: {sorted(allowed)[:20]})')
  return data.astype(np.uint8)


def preprocess_case(image_path, label_path=None, *, spacing: Sequence[float] = (1.5, 1.5, 2.0),
                    hu_window: Sequence[float] = (-175.0, 250.0),
                    label_names: Mapping[int, str] | None = None) -> PreprocessedCase:
  """Loads, validates, reorients to RAS+, resamples and clips one case.

  Args:
    image_path: NIfTI CT image (HU).
    label_path: NIfTI label map on the same grid, or None.
    spacing: target voxel size in mm `(3,)`.
    hu_window: (lo, hi) HU clip window.
    label_names: allowed label values -> names (from dataset.json); None allows 0..255.

  Returns:
    The `PreprocessedCase`.

  Raises:
    CaseError: naming the image or label file and what is wrong with it.
  """
  if any(s <= 0 for s in spacing):
    raise ValueError(f'target spacing must be positive, got {tuple(spacing)}')
  image_img, image = load_volume(image_path, 'image')
  _check_image(image_path, image)
  label = None
  if label_path is not None:
    label_img, label_data = load_volume(label_path, 'label')
    label = _check_label(label_path, label_img, label_data, image_img, label_names)

  original_affine = image_img.affine.copy()
  original_shape = tuple(int(s) for s in image_img.shape)
  original_spacing = tuple(float(z) for z in image_img.header.get_zooms()[:3])

  # Reorient by array flips/transposes only (no interpolation), exactly as nibabel's
  # as_closest_canonical does, applying the same transform to the label.
  transform = nib.orientations.ornt_transform(
      nib.orientations.io_orientation(original_affine),
      nib.orientations.axcodes2ornt(('R', 'A', 'S')))
  image = nib.orientations.apply_orientation(image, transform)
  ras_affine = original_affine @ nib.orientations.inv_ornt_aff(transform, original_shape)
  if label is not None:
    label = nib.orientations.apply_orientation(label, transform)

  image, affine = resample(np.ascontiguousarray(image), ras_affine, spacing, order=1)
  lo, hi = float(hu_window[0]), float(hu_window[1])
  image = np.rint(np.clip(image, lo, hi)).astype(np.int16)
  if label is not None:
    label, _ = resample(np.ascontiguousarray(label), ras_affine, spacing, order=0)
  return PreprocessedCase(
      image=image, label=label, spacing=tuple(float(s) for s in spacing), affine=affine,
      original_affine=original_affine, original_shape=original_shape,
      original_spacing=original_spacing)
