"""Raw cases -> staged, preprocessed cases: the per-case step of `prepare`.

Each case is read, reoriented, resampled and clipped by `nifti_io.preprocess_case` and staged
as one `.npz` for the TFDS builder; a bad case is skipped with its reason (or stops the run
when strict). What is recorded per case goes into `store.json`.
"""
import os
import time
from collections.abc import Mapping

import numpy as np

from pixssl_jax.data import ct_dataset
from pixssl_jax.data import nifti_io
from pixssl_jax.data.raw_cases import CaseError
from pixssl_jax.data.raw_cases import PrepareError
from pixssl_jax.data.raw_cases import RawCase
from pixssl_jax.data.raw_cases import RawDataset


def _case_meta(case: RawCase, pre, root: str) -> dict:
  """What `store.json` records of one case: its store geometry and where it came from."""
  return {
      'shape': list(pre.image.shape), 'spacing': list(pre.spacing),
      'affine': pre.affine.tolist(), 'original_affine': pre.original_affine.tolist(),
      'original_shape': list(pre.original_shape),
      'original_spacing': list(pre.original_spacing), 'has_label': pre.label is not None,
      'image_file': os.path.relpath(case.image, root),
      'label_file': os.path.relpath(case.label, root) if case.label else None,
  }


def process_cases(raw: RawDataset, staging, spacing, hu_window, strict: bool,
                  skipped: list[tuple[str, str]], verbose: bool
                  ) -> tuple[dict[str, dict], dict[int, str]]:
  """Preprocesses every case of `raw` into `staging/CASE.npz`.

  Args:
    raw: the discovered raw dataset.
    staging: folder (`epath.Path`) for the staged cases.
    spacing: target voxel size in mm, (x, y, z).
    hu_window: (lo, hi) HU window.
    strict: raise the first bad case instead of skipping it.
    skipped: (path, reason) list that skipped cases are appended to.
    verbose: print one progress line per case.

  Returns:
    {case id: metadata} of the cases written, and {label value > 0: the first label file
    holding it}.

  Raises:
    CaseError: the first bad case, with `strict`.
    PrepareError: no case could be preprocessed.
  """
  cases_meta, label_files = {}, {}
  for k, case in enumerate(raw.cases):
    t0 = time.time()
    try:
      # Called through the module so that tests can stand in for it.
      pre = nifti_io.preprocess_case(case.image, case.label, spacing=spacing,
                                     hu_window=hu_window, label_names=raw.label_names)
    except CaseError as e:
      if strict:
        raise
      skipped.append((e.path, e.reason))
      if verbose:
        print(f'[{k + 1}/{len(raw.cases)}] skip {e}', flush=True)
      continue
    ct_dataset.write_staged_case(
        staging / f'{case.case_id}.npz', case.case_id, pre.image, pre.label, pre.spacing,
        pre.affine, pre.original_affine, pre.original_shape, pre.original_spacing)
    if pre.label is not None:
      for value in np.unique(pre.label):
        if value:
          label_files.setdefault(int(value), case.label)
    cases_meta[case.case_id] = _case_meta(case, pre, raw.root)
    if verbose:
      print(f'[{k + 1}/{len(raw.cases)}] {case.case_id}: {tuple(pre.original_shape)} -> '
            f'{pre.image.shape}{" +label" if pre.label is not None else ""} '
            f'({time.time() - t0:.1f} s)', flush=True)
  if not cases_meta:
    raise PrepareError(raw.root, 'no usable case remains; skipped: '
                       + '; '.join(f'{p}: {r}' for p, r in skipped))
  return cases_meta, label_files


def check_consecutive_labels(label_files: Mapping[int, str]) -> None:
  """Without a dataset.json naming them, the label values are the classes 0..K-1.

  Fine-tuning needs exactly those (a class per output channel); any other value, such as 255
  for "ignore", would only be refused there, after the whole store was written.
  """
  values = sorted(label_files)
  odd = [v for v in values if v > len(values)]
  if not odd:
    return
  hint = ' (255 often marks voxels to ignore)' if 255 in odd else ''
  raise PrepareError(label_files[odd[0]], f'label value {odd[0]}{hint} is not a class '
                     f'number: without a dataset.json naming the classes, the label values '
                     f'must be 0 (background) to K-1, and these files hold {values}; remap '
                     'the labels to consecutive class numbers')


def class_names(label_names: Mapping[int, str] | None,
                label_files: Mapping[int, str]) -> dict[int, str]:
  """The layout's label names, or, without any, `class_k` for each value found."""
  if label_names is not None:
    return dict(label_names)
  return {0: 'background', **{v: f'class_{v}' for v in sorted(label_files)}}
