"""NIfTI export: a prediction on the store grid lands on the original (LPS-stored) grid."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax.data import prepare
from pixssl_jax.data.case_store import CaseStore
from pixssl_jax.evaluation import export

TARGET_SPACING = (1.5, 1.5, 2.0)


def _lps_affine(spacing, origin):
  affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
  affine[:3, 3] = origin
  return affine


def _organs(shape, spacing):
  """Label map with an off-centre box (1) and a sphere (2), asymmetric on purpose."""
  label = np.zeros(shape, np.uint8)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1) * spacing
  extent = np.asarray(shape) * spacing
  box = np.all((idx > extent * [0.1, 0.2, 0.15]) & (idx < extent * [0.45, 0.6, 0.5]), -1)
  label[box] = 1
  label[np.linalg.norm(idx - extent * [0.7, 0.6, 0.6], axis=-1) < 0.18 * extent.min()] = 2
  return label


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  raw = root / 'raw'
  cases = {
      # Raw spacing equals the store spacing: reorientation only, so the export is exact.
      'exact': ((20, 18, 12), TARGET_SPACING, (40.0, 30.0, -20.0)),
      # Finer in-plane, coarser in z: resampled on the way in and on the way out.
      'resampled': ((34, 30, 10), (1.0, 1.1, 2.6), (25.0, 12.0, 5.0)),
  }
  originals = {}
  rng = np.random.default_rng(0)
  for case_id, (shape, spacing, origin) in cases.items():
    affine = _lps_affine(spacing, origin)
    label = _organs(shape, spacing)
    image = (rng.normal(0, 50, shape) + 100.0 * label).astype(np.float32)
    for sub, data in (('imagesTr', image), ('labelsTr', label)):
      os.makedirs(raw / sub, exist_ok=True)
      nib.save(nib.Nifti1Image(data, affine), str(raw / sub / f'{case_id}.nii.gz'))
    originals[case_id] = (label, affine)
  (raw / 'dataset.json').write_text(json.dumps(
      {'labels': {'0': 'background', '1': 'liver', '2': 'spleen'}}))
  prepare.prepare_dataset(raw, root / 'store', spacing=TARGET_SPACING, verbose=False)
  return CaseStore(root / 'store'), originals, root


@pytest.mark.parametrize('case_id,min_agreement', [('exact', 1.0), ('resampled', 0.99)])
def test_exported_label_lies_on_the_original_grid(store, case_id, min_agreement):
  store, originals, root = store
  original_label, original_affine = originals[case_id]
  out_dir = str(root / f'predictions_{case_id}')
  label = np.asarray(store.label(case_id))
  uncertainty = label.astype(np.float32) * 0.25
  paths = export.export_case(store, case_id, label, out_dir, uncertainty=uncertainty)
  assert paths == {'label': os.path.join(out_dir, f'{case_id}.nii.gz'),
                   'uncertainty': os.path.join(out_dir, f'{case_id}_uncertainty.nii.gz')}
  assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(p) for p in paths.values())

  img = nib.load(paths['label'])
  data = np.asarray(img.dataobj)
  assert data.dtype == np.uint8
  assert data.shape == original_label.shape
  np.testing.assert_allclose(img.affine, original_affine, atol=1e-5)
  np.testing.assert_allclose(img.get_qform(), original_affine, atol=1e-5)
  assert nib.aff2axcodes(img.affine) == ('L', 'P', 'S')
  agreement = np.mean(data == original_label)
  if min_agreement == 1.0:
    np.testing.assert_array_equal(data, original_label)
  else:
    assert agreement >= min_agreement, agreement
    for value in (1, 2):   # Each organ comes back in place, not merely the background.
      a, b = data == value, original_label == value
      assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.9

  unc = nib.load(paths['uncertainty'])
  unc_data = unc.get_fdata(dtype=np.float32)
  assert unc.get_data_dtype() == np.float32 and unc_data.shape == original_label.shape
  np.testing.assert_allclose(unc.affine, original_affine, atol=1e-5)
  if min_agreement == 1.0:
    np.testing.assert_allclose(unc_data, original_label * 0.25, atol=1e-6)
  else:
    assert 0.0 <= unc_data.min() and unc_data.max() <= 0.5 + 1e-6


def test_export_rejects_bad_input(store):
  store, _, root = store
  meta = store.meta('exact')
  with pytest.raises(ValueError, match='not on the store grid'):
    export.export_labels(np.zeros((3, 3, 3), np.uint8), meta, str(root / 'x.nii.gz'))
  with pytest.raises(ValueError, match='integers'):
    export.export_labels(np.zeros(meta['shape'], np.float32), meta, str(root / 'x.nii.gz'))
  with pytest.raises(ValueError, match=r'\.nii'):
    export.export_labels(np.zeros(meta['shape'], np.uint8), meta, str(root / 'x.npy'))
  with pytest.raises(ValueError, match='original_affine'):
    export.export_labels(np.zeros(meta['shape'], np.uint8), {'affine': meta['affine']},
                         str(root / 'x.nii.gz'))
  assert not any(name.startswith('x') for name in os.listdir(root))
