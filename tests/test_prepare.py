"""Tests of NIfTI preprocessing, raw-layout discovery, splits, bad input and the store build."""
import gzip
import json
import os
import struct

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax.data import nifti_io
from pixssl_jax.data import prepare
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.data.nifti_io import CaseError

WIDE_WINDOW = (-2000.0, 2000.0)


def _save(path, data, affine, dtype=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = np.asarray(data) if dtype is None else np.asarray(data, dtype)
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return str(path)


def _ct(shape=(12, 12, 10), seed=0):
  return np.random.default_rng(seed).normal(0, 200, shape).astype(np.float32)


def _msd(root, n=4, n_test=1, shape=(12, 12, 10), labels=None):
  """A small MSD folder with n labelled and n_test unlabelled cases."""
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  for i in range(n):
    _save(root / 'imagesTr' / f'case_{i}.nii.gz', _ct(shape, i), aff)
    _save(root / 'labelsTr' / f'case_{i}.nii.gz', np.arange(np.prod(shape)).reshape(shape) % 2,
          aff, np.uint8)
  for i in range(n_test):
    _save(root / 'imagesTs' / f'test_{i}.nii.gz', _ct(shape, 100 + i), aff)
  (root / 'dataset.json').write_text(json.dumps(
      {'labels': labels or {'0': 'background', '1': 'liver'}}))
  return root


def test_lps_case_comes_out_ras_with_marker_at_expected_index(tmp_path):
  shape, spacing = (20, 22, 24), (1.5, 1.5, 2.0)
  lps = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
  lps[:3, 3] = [30.0, 20.0, -10.0]
  image = np.zeros(shape, np.float32)
  image[3, 5, 7] = 1000.0
  world = lps @ [3, 5, 7, 1]
  path = _save(tmp_path / 'lps.nii.gz', image, lps)
  case = nifti_io.preprocess_case(path, spacing=spacing, hu_window=WIDE_WINDOW)
  assert case.image.shape == shape
  # x and y are flipped (L->R, P->A); z is already superior.
  assert tuple(np.argwhere(case.image == 1000)[0]) == (16, 16, 7)
  assert np.all(np.diag(case.affine)[:3] > 0)
  np.testing.assert_allclose(case.affine @ [16, 16, 7, 1], world, atol=1e-6)
  np.testing.assert_allclose(case.original_affine, lps)
  assert case.original_shape == shape
  np.testing.assert_allclose(case.original_spacing, spacing)


def test_resampling_preserves_world_coordinates_of_voxel_centres(tmp_path):
  # A linear function of world position is reproduced exactly by linear interpolation, so
  # each resampled voxel must hold the function at the world point its affine claims.
  shape = (20, 18, 9)
  aff = np.diag([-1.0, 1.0, 3.0, 1.0])
  aff[:3, 3] = [5.0, -7.0, 2.0]
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  world = idx @ aff[:3, :3].T + aff[:3, 3]
  ramp = (3 * world[..., 0] + 2 * world[..., 1] + world[..., 2]).astype(np.float32)
  path = _save(tmp_path / 'ramp.nii', ramp, aff)
  case = nifti_io.preprocess_case(path, spacing=(2.0, 1.5, 2.0), hu_window=WIDE_WINDOW)
  assert case.image.shape == (10, 12, 14)
  np.testing.assert_allclose(case.spacing, (2.0, 1.5, 2.0))
  new_idx = np.stack(np.meshgrid(*[np.arange(n) for n in case.image.shape], indexing='ij'), -1)
  new_world = new_idx @ case.affine[:3, :3].T + case.affine[:3, 3]
  expected = 3 * new_world[..., 0] + 2 * new_world[..., 1] + new_world[..., 2]
  # Voxels whose centre lies beyond the outermost source voxel centre (within the source's
  # field of view, half a voxel wide) take the edge value instead of extrapolating.
  src = (new_world - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
  inside = np.all((src > -1e-6) & (src < np.array(shape) - 1 + 1e-6), axis=-1)
  assert inside.mean() > 0.85
  np.testing.assert_allclose(case.image[inside], expected[inside], atol=0.51)  # int16 rounding


def test_sphere_volume_survives_anisotropic_resampling(tmp_path):
  radius, spacing = 10.0, (0.7, 0.7, 3.0)
  shape = (40, 40, 10)
  aff = np.diag([*spacing, 1.0])
  aff[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(shape, spacing)]
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  inside = np.linalg.norm(idx * spacing + aff[:3, 3], axis=-1) <= radius
  image = np.where(inside, 60.0, -100.0).astype(np.float32)
  case = nifti_io.preprocess_case(
      _save(tmp_path / 'img.nii.gz', image, aff),
      _save(tmp_path / 'lab.nii.gz', inside, aff, np.uint8),
      spacing=(1.5, 1.5, 2.0), label_names={0: 'bg', 1: 'sphere'})
  assert case.label.dtype == np.uint8
  volume = case.label.sum() * 1.5 * 1.5 * 2.0
  assert volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)


def test_hu_is_clipped_to_window_and_stored_as_int16(tmp_path):
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  image = np.linspace(-1000, 1000, 8 * 8 * 6).reshape(8, 8, 6).astype(np.float32)
  case = nifti_io.preprocess_case(_save(tmp_path / 'a.nii', image, aff), spacing=(1.5, 1.5, 2),
                                  hu_window=(-175, 250))
  assert case.image.dtype == np.int16
  assert case.image.min() == -175 and case.image.max() == 250
  np.testing.assert_array_equal(case.image, np.rint(np.clip(image, -175, 250)))


def test_singleton_4d_is_accepted(tmp_path):
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  case = nifti_io.preprocess_case(_save(tmp_path / 'a.nii.gz', _ct()[..., None], aff))
  assert case.image.shape == (12, 12, 10)


def _write_bad_spacing(path, pixdim1):
  img = nib.Nifti1Image(_ct(), np.diag([1.5, 1.5, 2.0, 1.0]))
  nib.save(img, str(path) + '.tmp.nii')
  raw = bytearray(open(str(path) + '.tmp.nii', 'rb').read())
  os.remove(str(path) + '.tmp.nii')
  raw[80:84] = struct.pack('<f', pixdim1)  # pixdim[1], the x spacing, at byte 80
  with gzip.open(path, 'wb') as f:
    f.write(bytes(raw))
  return str(path)


@pytest.mark.parametrize('kind, reason', [
    ('not_nifti', 'not a readable NIfTI'),
    ('truncated', 'truncated or corrupt'),
    ('two_d', 'must be 3-D'),
    ('four_d', 'must be 3-D'),
    ('nan', 'NaN or Inf'),
    ('inf', 'NaN or Inf'),
    ('constant', 'constant'),
    ('zero_spacing', 'spacing must be positive'),
    ('negative_spacing', 'spacing must be positive'),
])
def test_bad_image_error_names_file_and_reason(tmp_path, kind, reason):
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  path = tmp_path / f'{kind}.nii.gz'
  if kind == 'not_nifti':
    path.write_bytes(b'this is not an image')
  elif kind == 'truncated':
    _save(path, _ct((30, 30, 30)), aff)
    path.write_bytes(path.read_bytes()[:4000])
  elif kind == 'two_d':
    _save(path, _ct()[..., 0], aff)
  elif kind == 'four_d':
    _save(path, np.stack([_ct(), _ct()], -1), aff)
  elif kind in ('nan', 'inf'):
    data = _ct()
    data[2, 3, 4] = np.nan if kind == 'nan' else np.inf
    _save(path, data, aff)
  elif kind == 'constant':
    _save(path, np.full((8, 8, 8), 40.0, np.float32), aff)
  else:
    _write_bad_spacing(path, 0.0 if kind == 'zero_spacing' else -1.5)
  with pytest.raises(CaseError) as e:
    nifti_io.preprocess_case(path)
  assert str(e.value).startswith(f'{path}: ')
  assert reason in str(e.value)


@pytest.mark.parametrize('kind, reason', [
    ('shape', 'label shape (12, 12, 9) does not match image shape (12, 12, 10)'),
    ('affine', 'label affine does not match image affine'),
    ('values', 'label values [3] are not in dataset.json'),
    ('non_integer', 'non-integer'),
])
def test_bad_label_error_names_file_and_reason(tmp_path, kind, reason):
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  image = _save(tmp_path / 'img.nii.gz', _ct(), aff)
  label = np.zeros((12, 12, 10), np.float32)
  label[2:5, 2:5, 2:5] = 1
  label_aff = aff
  if kind == 'shape':
    label = label[..., :9]
  elif kind == 'affine':
    label_aff = np.diag([1.5, 1.5, 2.5, 1.0])
  elif kind == 'values':
    label[0, 0, 0] = 3
  else:
    label[0, 0, 0] = 0.5
  label_path = _save(tmp_path / 'lab.nii.gz', label, label_aff)
  with pytest.raises(CaseError) as e:
    nifti_io.preprocess_case(image, label_path, label_names={0: 'background', 1: 'liver'})
  assert str(e.value).startswith(f'{label_path}: ')
  assert reason in str(e.value)


def test_bad_folders_raise_prepare_error(tmp_path):
  with pytest.raises(prepare.PrepareError, match='does not exist'):
    prepare.discover(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(prepare.PrepareError, match=r'empty: raw folder is empty'):
    prepare.discover(tmp_path / 'empty')
  (tmp_path / 'msd' / 'imagesTr').mkdir(parents=True)
  with pytest.raises(prepare.PrepareError, match=r'imagesTr: contains no NIfTI images'):
    prepare.discover(tmp_path / 'msd')
  (tmp_path / 'odd' / 'stuff').mkdir(parents=True)
  with pytest.raises(prepare.PrepareError, match='no known layout'):
    prepare.discover(tmp_path / 'odd')


def test_discovery_of_msd_btcv_and_folder_layouts(tmp_path):
  aff = np.eye(4)
  msd = _msd(tmp_path / 'msd', n=2, n_test=1, shape=(4, 4, 4))
  (msd / 'imagesTr' / '._case_0.nii.gz').write_bytes(b'mac resource fork')  # ignored
  (msd / 'imagesTr' / 'notes.txt').write_text('x')
  meta = json.loads((msd / 'dataset.json').read_text())
  meta['training'] = [{'image': './imagesTr/case_0.nii.gz', 'label': './labelsTr/case_0.nii.gz'},
                      {'image': './imagesTr/gone.nii.gz', 'label': './labelsTr/gone.nii.gz'}]
  (msd / 'dataset.json').write_text(json.dumps(meta))
  raw = prepare.discover(msd)
  assert raw.layout == 'msd' and raw.label_names == {0: 'background', 1: 'liver'}
  assert [(c.case_id, c.label is not None) for c in raw.cases] == [
      ('case_0', True), ('case_1', True), ('test_0', False)]
  errors = {os.path.basename(e.path): e.reason for e in raw.errors}
  assert errors['gone.nii.gz'] == 'listed in dataset.json but the file is missing'
  assert 'not a NIfTI file name' in errors['notes.txt']

  for i in (1, 2):
    _save(tmp_path / 'btcv' / 'img' / f'img000{i}.nii.gz', _ct((4, 4, 4)), aff)
  _save(tmp_path / 'btcv' / 'label' / 'label0001.nii.gz', np.zeros((4, 4, 4)), aff, np.uint8)
  raw = prepare.discover(tmp_path / 'btcv')
  assert raw.layout == 'btcv' and raw.label_names[6] == 'liver'
  assert [(c.case_id, c.label is not None) for c in raw.cases] == [
      ('img0001', True), ('img0002', False)]

  _save(tmp_path / 'gen' / 'scans' / 'a.nii', _ct((4, 4, 4)), aff)
  _save(tmp_path / 'gen' / 'masks' / 'a.nii', np.zeros((4, 4, 4)), aff, np.uint8)
  raw = prepare.discover(tmp_path / 'gen', images_dir='scans', labels_dir='masks')
  assert [(c.case_id, os.path.basename(c.label)) for c in raw.cases] == [('a', 'a.nii')]


def test_nnunet_channel_suffix_is_stripped_only_where_every_image_has_one(tmp_path):
  aff, vol = np.eye(4), _ct((4, 4, 4))
  for name in ('case_0000', 'case_0001'):  # Plain MSD names that happen to end in _0000.
    _save(tmp_path / 'msd' / 'imagesTr' / f'{name}.nii.gz', vol, aff)
    _save(tmp_path / 'msd' / 'labelsTr' / f'{name}.nii.gz', np.zeros((4, 4, 4)), aff, np.uint8)
  assert [c.case_id for c in prepare.discover(tmp_path / 'msd').cases] == [
      'case_0000', 'case_0001']
  for name in ('liver_001', 'liver_002'):  # nnU-Net raw format: a channel tag on every image.
    _save(tmp_path / 'nnunet' / 'imagesTr' / f'{name}_0000.nii.gz', vol, aff)
    _save(tmp_path / 'nnunet' / 'labelsTr' / f'{name}.nii.gz', np.zeros((4, 4, 4)), aff, np.uint8)
  cases = prepare.discover(tmp_path / 'nnunet').cases
  assert [(c.case_id, os.path.basename(c.label)) for c in cases] == [
      ('liver_001', 'liver_001.nii.gz'), ('liver_002', 'liver_002.nii.gz')]


def test_splits_are_seeded_disjoint_and_nested():
  ids = [f'c{i:02d}' for i in range(40)]
  labelled = ids[:30]
  s = splits_lib.make_splits(ids, labelled, seed=3)
  assert s == splits_lib.make_splits(reversed(ids), reversed(labelled), seed=3)
  assert s != splits_lib.make_splits(ids, labelled, seed=4)
  assert s['pretrain'] == ids
  assert (len(s['val']), len(s['test']), len(s['train_100']), len(s['train_10'])) == (6, 6, 18, 2)
  parts = [set(s['val']), set(s['test']), set(s['train_100'])]
  assert set.union(*parts) == set(labelled) and sum(map(len, parts)) == len(labelled)
  assert set(s['train_10']) <= set(s['train_100'])
  tiny = splits_lib.make_splits(['a', 'b', 'c'], ['a', 'b', 'c'], seed=0)
  assert [len(tiny[k]) for k in ('val', 'test', 'train_100', 'train_10')] == [1, 1, 1, 1]


def test_prepare_skips_bad_cases_and_writes_store(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=4, n_test=1)
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  _save(raw / 'imagesTr' / 'flat.nii.gz', np.zeros((12, 12, 10), np.float32), aff)
  (raw / 'imagesTr' / 'junk.nii.gz').write_bytes(b'garbage')
  rc = prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store'),
                     '--seed', '1', '--quiet'])
  out = capsys.readouterr().out
  assert rc == 0
  assert 'prepared 5 cases (4 labelled)' in out and 'skipped 2 cases' in out
  assert f"{raw / 'imagesTr' / 'flat.nii.gz'}: image is constant" in out
  store = json.loads((tmp_path / 'store' / 'store.json').read_text())
  assert store['format_version'] == 1 and store['hu_window'] == [-175.0, 250.0]
  assert store['spacing'] == [1.5, 1.5, 2.0] and store['label_names']['1'] == 'liver'
  assert sorted(store['cases']) == ['case_0', 'case_1', 'case_2', 'case_3', 'test_0']
  c0 = store['cases']['case_0']
  assert c0['original_shape'] == [12, 12, 10] and c0['original_spacing'] == [1.5, 1.5, 2.0]
  np.testing.assert_allclose(c0['original_affine'], aff)
  assert not store['cases']['test_0']['has_label']
  assert len(store['skipped']) == 2
  saved = splits_lib.read_splits(tmp_path / 'store' / 'splits.json')
  assert saved == splits_lib.make_splits(store['cases'], [f'case_{i}' for i in range(4)], seed=1)
  assert (tmp_path / 'store' / 'tfds' / 'ct_volumes' / '1.0.0' / 'dataset_info.json').exists()
  assert sorted(os.listdir(tmp_path)) == ['raw', 'store']  # no temp dir left
  # An existing store is refused without --overwrite.
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store')]) == 1
  assert '--overwrite' in capsys.readouterr().err


def test_strict_run_fails_on_first_bad_case_and_leaves_nothing(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=2, n_test=0, labels={'0': 'background'})
  with pytest.raises(CaseError) as e:
    prepare.prepare_dataset(raw, tmp_path / 'store', strict=True, verbose=False)
  assert str(e.value).startswith(str(raw / 'labelsTr' / 'case_0.nii.gz'))
  assert 'label values [1] are not in dataset.json' in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ['raw']
  # Without --strict nothing usable remains either: non-zero exit, still no store.
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store')]) == 1
  assert 'no usable case remains' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['raw']


def test_to_original_grid_undoes_reorientation_and_resampling(tmp_path):
  aff = np.diag([-1.5, -1.5, 2.0, 1.0])
  aff[:3, 3] = [12.0, -4.0, 30.0]
  label = np.zeros((16, 14, 12), np.uint8)
  label[3:9, 4:12, 2:8] = 1
  image = _save(tmp_path / 'img.nii.gz', _ct((16, 14, 12)), aff)
  label_path = _save(tmp_path / 'lab.nii.gz', label, aff, np.uint8)
  # Same spacing: only flips, so the round trip is exact.
  case = nifti_io.preprocess_case(image, label_path, spacing=(1.5, 1.5, 2.0))
  back = nifti_io.to_original_grid(case.label, case.affine, case.original_affine,
                                   case.original_shape)
  np.testing.assert_array_equal(back, label)
  # Coarser store grid: the box comes back with its boundary off by at most one voxel.
  case = nifti_io.preprocess_case(image, label_path, spacing=(3.0, 3.0, 4.0))
  back = nifti_io.to_original_grid(case.label, case.affine, case.original_affine,
                                   case.original_shape)
  assert back.shape == label.shape and np.mean(back != label) < 0.1
  assert back[5, 8, 4] == 1 and back[15, 0, 11] == 0
