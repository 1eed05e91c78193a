"""Writes predictions back onto each case's original grid as NIfTI.

Predictions are made on the store grid (RAS+, resampled to the store spacing). A file that
opens over the original image in 3D Slicer or ITK-SNAP must instead have the raw file's shape
and affine. `nifti_io.to_original_grid` does the mapping: for every original voxel centre it
goes original index -> world (original affine) -> store index (inverse store affine) and
samples there, nearest neighbour for labels (order 0, so no invented classes), linear for
float maps such as MC-dropout uncertainty. Where the store spacing equals the raw spacing the
index map is a pure axis flip/permutation with integer offsets and the export is exact.

Files are written as `.nii.gz` under a temporary name in the target folder and renamed, so a
reader never sees a half-written prediction. Both qform and sform hold the original affine
with code 1 (scanner), which every common viewer honours.
"""
import os
import uuid
from collections.abc import Mapping

import nibabel as nib
import numpy as np

from pixssl_jax.data import nifti_io

PREDICTIONS_SUBDIR = 'predictions'


def prediction_path(out_dir: str, case_id: str, kind: str = 'label') -> str:
  """`out_dir/{case_id}.nii.gz` for labels, `out_dir/{case_id}_{kind}.nii.gz` otherwise."""
  suffix = '' if kind == 'label' else f'_{kind}'
  return os.path.join(out_dir, f'{case_id}{suffix}.nii.gz')


def _geometry(meta: Mapping, what: str, volume: np.ndarray | None = None):
  """(store affine, original affine, original shape), checked; `volume` on the store grid."""
  try:
    affine = np.asarray(meta['affine'], np.float64)
    original_affine = np.asarray(meta['original_affine'], np.float64)
    original_shape = tuple(int(s) for s in meta['original_shape'])
  except KeyError as e:
    raise ValueError(f'{what}: case metadata has no {e.args[0]!r} (pass store.meta(case_id))'
                     ) from None
  if affine.shape != (4, 4) or original_affine.shape != (4, 4) or len(original_shape) != 3:
    raise ValueError(f'{what}: case metadata needs 4x4 affines and a 3-D original_shape, got '
                     f'{affine.shape}, {original_affine.shape}, {original_shape}')
  if volume is None:
    return affine, original_affine, original_shape
  if 'shape' in meta and tuple(volume.shape) != tuple(int(s) for s in meta['shape']):
    raise ValueError(f'{what}: array of shape {tuple(volume.shape)} is not on the store grid '
                     f'of this case {tuple(meta["shape"])}')
  if volume.ndim != 3:
    raise ValueError(f'{what}: expected a 3-D [X, Y, Z] array, got shape {volume.shape}')
  return affine, original_affine, original_shape


def _atomic_save(data: np.ndarray, affine: np.ndarray, path: str) -> str:
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm')
  return _write_atomically(img, path)


def _write_atomically(img, path: str) -> str:
  """Saves `img` under a temporary name beside `path`, then renames it to `path`."""
  if not path.endswith(nifti_io.NIFTI_SUFFIXES):
    raise ValueError(f'{path}: output name must end in .nii.gz or .nii')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = '.nii.gz' if path.endswith('.nii.gz') else '.nii'  # nibabel picks gzip by suffix.
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}-'
                     f'{uuid.uuid4().hex[:8]}{suffix}')
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_on_reference_grid(data: np.ndarray, reference, path: str) -> str:
  """Saves `data` with `reference`'s header geometry, so it reads back with the same affine.

  The qform, the sform and their codes are copied from the reference NIfTI image as stored
  (not recomputed from its affine, which float rounding could change), and the scaling is
  cleared, so `data` is written as it is.

  Args:
    data: `[*reference.shape[:3]]` array (uint8 labels, float32 maps).
    reference: the nibabel image of the input scan.
    path: output `.nii.gz` or `.nii`.
  """
  if tuple(data.shape) != tuple(reference.shape[:3]):
    raise ValueError(f'{path}: array of shape {tuple(data.shape)} is not on the reference '
                     f'grid {tuple(reference.shape[:3])}')
  header = reference.header.copy()
  header.set_data_dtype(data.dtype)
  header.set_slope_inter(None, None)
  # affine=None: nibabel then takes the geometry from the header instead of rewriting it.
  return _write_atomically(type(reference)(data, None, header=header), path)


def labels_on_original_grid(labels: np.ndarray, meta: Mapping, what: str = 'labels'
                            ) -> np.ndarray:
  """A store-grid label map resampled (nearest) onto the case's original grid.

  Args:
    labels: integer label map `[X, Y, Z]` on the store grid, values in 0..255.
    meta: `store.meta(case_id)` (uses `affine`, `original_affine`, `original_shape`, `shape`).
    what: names the labels in errors (the output file, usually).

  Returns:
    uint8 `[*original_shape]`: what `export_labels` writes.
  """
  labels = np.asarray(labels)
  affine, original_affine, original_shape = _geometry(meta, what, labels)
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f'{what}: labels must be integers, got dtype {labels.dtype}')
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(f'{what}: label values must be in 0..255, got {labels.min()}..'
                     f'{labels.max()}')
  return nifti_io.to_original_grid(np.ascontiguousarray(labels.astype(np.uint8)), affine,
                                   original_affine, original_shape, order=0)


def save_original_grid_labels(labels: np.ndarray, meta: Mapping, path: str) -> str:
  """Saves an original-grid label map (from `labels_on_original_grid`) with the raw affine."""
  _, original_affine, original_shape = _geometry(meta, path)
  if tuple(labels.shape) != original_shape:
    raise ValueError(f'{path}: labels of shape {tuple(labels.shape)} are not on the original '
                     f'grid {original_shape}')
  return _atomic_save(np.asarray(labels, np.uint8), original_affine, path)


def export_labels(labels: np.ndarray, meta: Mapping, path: str) -> str:
  """Saves a store-grid label map on the case's original grid with the original affine.

  Args:
    labels: integer label map `[X, Y, Z]` on the store grid, values in 0..255.
    meta: `store.meta(case_id)` (uses `affine`, `original_affine`, `original_shape`, `shape`).
    path: output `.nii.gz` (or `.nii`) file.

  Returns:
    `path`, holding uint8 `[*original_shape]`.
  """
  return save_original_grid_labels(labels_on_original_grid(labels, meta, path), meta, path)


def export_float_map(values: np.ndarray, meta: Mapping, path: str) -> str:
  """Saves a float map (uncertainty, probability) on the original grid, linearly resampled.

  Args:
    values: float `[X, Y, Z]` on the store grid.
    meta: `store.meta(case_id)`.
    path: output `.nii.gz` (or `.nii`) file.

  Returns:
    `path`, holding float32 `[*original_shape]`.
  """
  values = np.asarray(values, np.float32)
  affine, original_affine, original_shape = _geometry(meta, path, values)
  if not np.all(np.isfinite(values)):
    raise ValueError(f'{path}: map has NaN or Inf values')
  out = nifti_io.to_original_grid(np.ascontiguousarray(values), affine, original_affine,
                                  original_shape, order=1)
  return _atomic_save(out, original_affine, path)


def save_case(meta: Mapping, case_id: str, original_labels: np.ndarray, out_dir: str,
              uncertainty: np.ndarray | None = None) -> dict[str, str]:
  """Writes a case's original-grid labels (and optional store-grid uncertainty map).

  Returns:
    {'label': path} plus {'uncertainty': path} when a map was given.
  """
  paths = {'label': save_original_grid_labels(original_labels, meta,
                                              prediction_path(out_dir, case_id))}
  if uncertainty is not None:
    paths['uncertainty'] = export_float_map(
        uncertainty, meta, prediction_path(out_dir, case_id, 'uncertainty'))
  return paths


def export_case(store, case_id: str, labels: np.ndarray, out_dir: str,
                uncertainty: np.ndarray | None = None) -> dict[str, str]:
  """Exports one case's prediction (and optional uncertainty map) from a `CaseStore`.

  Args:
    store: `pixssl_jax.data.case_store.CaseStore` the case comes from.
    case_id: the case.
    labels: predicted label map `[X, Y, Z]` on the store grid.
    out_dir: folder, usually `WORKDIR/predictions`.
    uncertainty: optional float map `[X, Y, Z]` on the store grid.

  Returns:
    {'label': path} plus {'uncertainty': path} when a map was given.
  """
  meta = store.meta(case_id)
  path = prediction_path(out_dir, case_id)
  return save_case(meta, case_id, labels_on_original_grid(labels, meta, path), out_dir,
                   uncertainty)
