"""Tests of the raw-folder layout plug-ins: the registry, precedence, images-only folders."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax.data import layouts
from pixssl_jax.data import prepare
from pixssl_jax.data import raw_cases


def _save(path, shape=(6, 6, 4), label=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  values = np.random.default_rng(0).integers(-100, 100, shape)
  data = (values > 0).astype(np.uint8) if label else values.astype(np.int16)
  nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
  return str(path)


def test_built_in_layouts_are_registered_most_specific_first():
  assert [layout.name for layout in layouts.registered()] == [
      'msd', 'btcv', 'folders', 'images']


def test_a_registered_layout_is_discovered_and_prepared(tmp_path):
  """A layout of scan/NAME/image.nii.gz + scan/NAME/mask.nii.gz, added by registration only."""
  for name in ('a', 'b'):
    _save(tmp_path / 'raw' / 'scan' / name / 'image.nii.gz')
  _save(tmp_path / 'raw' / 'scan' / 'a' / 'mask.nii.gz', label=True)

  def find(root, cases, errors):
    for name in sorted(os.listdir(os.path.join(root, 'scan'))):
      folder = os.path.join(root, 'scan', name)
      mask = os.path.join(folder, 'mask.nii.gz')
      raw_cases.add_case(cases, raw_cases.RawCase(
          name, os.path.join(folder, 'image.nii.gz'), mask if os.path.exists(mask) else None),
          errors)
    return layouts.Found(label_names={0: 'background', 1: 'tumour'}, where=root)

  layouts.register(layouts.Layout(
      name='per_case_folders', expected='scan/NAME/image.nii.gz (per-case folders)',
      detect=lambda root: os.path.isdir(os.path.join(root, 'scan')), find=find))
  try:
    raw = prepare.discover(tmp_path / 'raw')
    assert raw.layout == 'per_case_folders'
    assert [(c.case_id, c.label is not None) for c in raw.cases] == [('a', True), ('b', False)]
    summary = prepare.prepare_dataset(tmp_path / 'raw', tmp_path / 'store', verbose=False)
    assert summary.written == ['a', 'b'] and summary.labelled == ['a']
    store = json.loads((tmp_path / 'store' / 'store.json').read_text())
    assert store['layout'] == 'per_case_folders'
    assert store['label_names'] == {'0': 'background', '1': 'tumour'}
    # Every registered layout is named when a folder matches none.
    (tmp_path / 'odd' / 'stuff').mkdir(parents=True)
    with pytest.raises(prepare.PrepareError, match=r'\(images only\) or scan/NAME/image'):
      prepare.discover(tmp_path / 'odd')
  finally:
    layouts.unregister('per_case_folders')
  assert 'per_case_folders' not in [layout.name for layout in layouts.registered()]


def test_images_only_folder_is_read_unlabelled(tmp_path):
  for name in ('s1.nii.gz', 's2.nii'):
    _save(tmp_path / 'raw' / name)
  (tmp_path / 'raw' / 'notes.txt').write_text('x')
  (tmp_path / 'raw' / '._s1.nii.gz').write_bytes(b'mac resource fork')
  raw = prepare.discover(tmp_path / 'raw')
  assert raw.layout == 'images' and raw.label_names is None
  assert [(c.case_id, c.label) for c in raw.cases] == [('s1', None), ('s2', None)]
  assert [os.path.basename(e.path) for e in raw.errors] == ['notes.txt']


def test_a_known_layout_wins_over_images_in_the_folder_itself(tmp_path):
  _save(tmp_path / 'raw' / 'images' / 'a.nii.gz')
  _save(tmp_path / 'raw' / 'stray.nii.gz')
  raw = prepare.discover(tmp_path / 'raw')
  assert raw.layout == 'folders' and [c.case_id for c in raw.cases] == ['a']


def test_the_refusal_names_the_built_in_layouts(tmp_path):
  (tmp_path / 'odd' / 'stuff').mkdir(parents=True)
  with pytest.raises(prepare.PrepareError) as e:
    prepare.discover(tmp_path / 'odd')
  assert str(e.value).endswith(
      'no known layout: expected imagesTr/ (+ labelsTr/, dataset.json) (MSD), img/ + label/ '
      '(BTCV), images/ + labels/ or .nii/.nii.gz images in the folder itself (images only)')
