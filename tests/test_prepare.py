"""Tests of NIfTI preprocessing, raw-layout discovery, splits, bad input and the store build."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax.data import case_store
from pixssl_jax.data import nifti_io
from pixssl_jax.data import prepare
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.data import store_folder
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
  raw = prepare.discover(tmp_path / 'gen', images_dir=tmp_path / 'gen' / 'scans',
                         labels_dir=tmp_path / 'gen' / 'masks')
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
  # No val or test image reaches pre-training; every other case does.
  assert s['pretrain'] == sorted(s['train_100'] + ids[30:])
  assert not set(s['pretrain']) & (set(s['val']) | set(s['test']))
  transductive = splits_lib.make_splits(ids, labelled, seed=3, transductive=True)
  assert transductive == {**s, 'pretrain': ids}
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
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store')]) == 2
  assert '--overwrite' in capsys.readouterr().err


def test_strict_run_fails_on_first_bad_case_and_leaves_nothing(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=2, n_test=0, labels={'0': 'background'})
  with pytest.raises(CaseError) as e:
    prepare.prepare_dataset(raw, tmp_path / 'store', strict=True, verbose=False)
  assert str(e.value).startswith(str(raw / 'labelsTr' / 'case_0.nii.gz'))
  assert 'label values [1] are not in dataset.json' in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ['raw']
  # Without --strict nothing usable remains either: non-zero exit, still no store.
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store')]) == 2
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


def _tree(folder):
  """{relative path: bytes} of every file under `folder`."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


def test_cli_takes_negative_number_lists_as_separate_tokens(tmp_path, monkeypatch):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  # The form the docs show, through the real argv path of `python -m ...prepare`.
  monkeypatch.setattr(sys, 'argv', ['prepare', '--raw_dir', str(raw), '--data_dir',
                                    str(tmp_path / 'store'), '--hu_window', '-300,-20',
                                    '--spacing', '3,3,4', '--quiet'])
  assert prepare.main() == 0
  store = json.loads((tmp_path / 'store' / 'store.json').read_text())
  assert store['hu_window'] == [-300.0, -20.0] and store['spacing'] == [3.0, 3.0, 4.0]
  options = ['--hu_window', '--spacing', '--seed', '--raw_dir', '--data_dir']
  join = lambda argv: prepare.join_negative_values(argv, options, options + ['--strict'])
  assert join(['--hu', '-1e3,-.5', '--seed', '-3', '--strict', '--', '--spacing', '-1']) == [
      '--hu=-1e3,-.5', '--seed=-3', '--strict', '--', '--spacing', '-1']
  assert join(['--raw_dir', '--data_dir', 'x']) == ['--raw_dir', '--data_dir', 'x']


def test_cli_negative_spacing_is_a_named_error(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store'),
                       '--spacing', '-1.5,1.5,2']) == 2
  assert '--spacing: needs 3 positive values' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['raw']


def test_paths_are_made_absolute_with_home_expanded(tmp_path, monkeypatch):
  raw = _msd(tmp_path / 'work' / 'raw', n=3, n_test=0)
  monkeypatch.chdir(tmp_path / 'work')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  summary = prepare.prepare_dataset('raw', '~/stores/liver', verbose=False)
  assert summary.data_dir == str(tmp_path / 'home' / 'stores' / 'liver')
  store = json.loads((tmp_path / 'home' / 'stores' / 'liver' / 'store.json').read_text())
  assert store['raw_dir'] == str(raw)
  assert sorted(os.listdir(tmp_path / 'work')) == ['raw']  # no literal '~' folder
  # Explicit image/label folders are relative to the current directory as well.
  assert prepare.main(['--raw_dir=raw', '--images_dir=raw/imagesTr', '--labels_dir',
                       'raw/labelsTr', '--data_dir=store', '--quiet']) == 0
  store = json.loads((tmp_path / 'work' / 'store' / 'store.json').read_text())
  assert store['layout'] == 'folders' and store['raw_dir'] == str(raw)
  assert store['cases']['case_0']['label_file'] == os.path.join('labelsTr', 'case_0.nii.gz')
  with pytest.raises(prepare.PrepareError, match=r'^gs://b/raw: --raw_dir: prepare reads '
                     'local folders only'):
    prepare.prepare_dataset('gs://b/raw', 'store2', verbose=False)


def test_overwrite_refuses_raw_and_user_folders_and_leaves_their_files(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  raw_files = _tree(raw)
  (tmp_path / 'link').symlink_to(raw)
  for data_dir, reason in [(raw, f'is the same folder as --raw_dir {raw}'),
                           (tmp_path / 'link', f'is the same folder as --raw_dir {raw}'),
                           (raw / 'store', f'is inside --raw_dir {raw}'),
                           (tmp_path, f'contains --raw_dir {raw}')]:
    assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(data_dir), '--overwrite',
                         '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {data_dir}: --data_dir {reason}') and err.count('\n') == 1
    assert _tree(raw) == raw_files
  user = tmp_path / 'thesis'
  (user / 'figures').mkdir(parents=True)
  (user / 'figures' / 'fig1.txt').write_text('precious')
  user_files = _tree(user)
  for flags, reason in [(['--overwrite'], '--overwrite replaces only stores, nothing was '
                         'touched'), ([], 'choose a new or empty folder')]:
    assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(user), '--quiet',
                         *flags]) == 2
    assert capsys.readouterr().err == (
        f'error: {user}: --data_dir is not empty and is not a store written by prepare '
        f'(no store.json); {reason}\n')
    assert _tree(user) == user_files
  assert sorted(os.listdir(tmp_path)) == ['link', 'raw', 'thesis']  # no temp folder left


def test_empty_folder_is_written_and_only_a_store_is_overwritten(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  store = tmp_path / 'store'
  store.mkdir()
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(store), '--quiet']) == 0
  assert json.loads((store / 'splits.json').read_text())['seed'] == 0
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(store), '--quiet']) == 2
  assert capsys.readouterr().err == (
      f'error: {store}: store already exists; pass --overwrite to replace it\n')
  (store / 'npy_cache').mkdir()  # What CaseStore adds to a store: replaced with it.
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(store), '--overwrite',
                       '--seed', '5', '--quiet']) == 0
  assert json.loads((store / 'splits.json').read_text())['seed'] == 5
  assert not (store / 'npy_cache').exists()
  assert sorted(os.listdir(tmp_path)) == ['raw', 'store']


_HANG_IN_PREPARE = """
import sys, time
from pixssl_jax.data import nifti_io, prepare
nifti_io.preprocess_case = lambda *args, **kwargs: time.sleep(600)
prepare.main(sys.argv[1:])
"""


def test_temp_folder_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  child = subprocess.Popen(
      [sys.executable, '-c', _HANG_IN_PREPARE, '--raw_dir', str(raw), '--data_dir',
       str(tmp_path / 'store'), '--quiet'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    deadline = time.time() + 120
    while not [n for n in os.listdir(tmp_path) if n.startswith('.store.tmp-')]:
      assert child.poll() is None and time.time() < deadline, 'prepare did not start'
      time.sleep(0.05)
  finally:
    child.kill()  # SIGKILL: no handler runs, the temporary folder stays behind.
    child.wait()
  left = [n for n in os.listdir(tmp_path) if n.startswith('.store.tmp-')]
  assert len(left) == 1
  # Not to be touched: a run in progress (this process), another host's run, other names.
  other_host = 'ffffffff' if store_folder.HOST_TAG != 'ffffffff' else '00000000'
  keep = [f'.store.tmp-{store_folder.HOST_TAG}-{os.getpid()}-0123abcd',
          f'.store.tmp-{other_host}-{child.pid}-0123abcd',
          f'.other.tmp-{child.pid}-0123abcd', '.store.tmp-notes']
  for name in keep:
    (tmp_path / name).mkdir()
  legacy = tmp_path / f'.store.old-{child.pid}-89abcdef'  # name without the host tag
  legacy.mkdir()
  (legacy / 'store.json').write_text('{}')
  prepare.prepare_dataset(raw, tmp_path / 'store', verbose=False)
  assert sorted(os.listdir(tmp_path)) == sorted(['raw', 'store', *keep])


def test_sigterm_during_prepare_removes_its_temp_folder(tmp_path, monkeypatch, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  seen = []

  def preprocess_then_sigterm(*args, **kwargs):
    seen.append(sorted(os.listdir(tmp_path)))
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError('SIGTERM did not stop prepare')

  monkeypatch.setattr(nifti_io, 'preprocess_case', preprocess_then_sigterm)
  handler = signal.getsignal(signal.SIGTERM)
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / 'store'),
                       '--quiet']) == 128 + signal.SIGTERM
  assert 'stopped by SIGTERM' in capsys.readouterr().err
  assert len(seen) == 1 and [n for n in seen[0] if n.startswith('.store.tmp-')]
  assert sorted(os.listdir(tmp_path)) == ['raw']
  assert signal.getsignal(signal.SIGTERM) is handler


def test_duplicate_case_ids_are_errors_naming_both_files(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  _save(raw / 'imagesTr' / 'case_1.nii', _ct(seed=9), aff)  # beside case_1.nii.gz
  _save(raw / 'labelsTr' / 'case_2.nii', np.zeros((12, 12, 10)), aff, np.uint8)
  summary = prepare.prepare_dataset(raw, tmp_path / 'store', verbose=False)
  assert summary.written == ['case_0']
  assert sorted(summary.skipped) == [
      (str(raw / sub / f'{cid}.nii'), f"case id {cid!r} is also given by "
       f"{raw / sub / f'{cid}.nii.gz'}; remove or rename one of the two files")
      for sub, cid in (('imagesTr', 'case_1'), ('labelsTr', 'case_2'))]
  with pytest.raises(CaseError, match=r"case id 'case_\d' is also given by"):
    prepare.prepare_dataset(raw, tmp_path / 'strict', strict=True, verbose=False)
  assert not (tmp_path / 'strict').exists()


@pytest.mark.parametrize('value, reason', [
    (1e30, 'image has 1 voxels outside +-100000 (min '),
    (-2e5, 'image has 1 voxels outside +-100000 (min -200000, '),
    (np.nan, 'image has 1 NaN or Inf voxels'),
])
def test_values_that_cannot_be_hu_are_named_errors(tmp_path, value, reason):
  raw = _msd(tmp_path / 'raw', n=2, n_test=0)
  data = _ct(seed=1).astype(np.float64)
  data[1, 2, 3] = value
  bad = _save(raw / 'imagesTr' / 'case_1.nii.gz', data, np.diag([1.5, 1.5, 2.0, 1.0]))
  summary = prepare.prepare_dataset(raw, tmp_path / 'store', verbose=False)
  assert summary.written == ['case_0']
  [(path, message)] = summary.skipped
  assert path == bad and message.startswith(reason)
  with pytest.raises(CaseError) as e:
    prepare.prepare_dataset(raw, tmp_path / 'strict', strict=True, verbose=False)
  assert str(e.value).startswith(f'{bad}: {reason}')


def test_pretrain_split_leaves_out_val_and_test_unless_transductive(tmp_path):
  raw = _msd(tmp_path / 'raw', n=6, n_test=2, shape=(6, 6, 5))
  for name, flags in (('store', []), ('transductive', ['--transductive'])):
    assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(tmp_path / name),
                         '--quiet', *flags]) == 0
  default = json.loads((tmp_path / 'store' / 'splits.json').read_text())
  split = default['splits']
  assert default['pretrain_excludes_eval'] is True
  assert split['val'] and split['test']
  assert not set(split['pretrain']) & (set(split['val']) | set(split['test']))
  assert split['pretrain'] == sorted(split['train_100'] + ['test_0', 'test_1'])
  every = json.loads((tmp_path / 'transductive' / 'splits.json').read_text())
  assert every['pretrain_excludes_eval'] is False
  assert every['splits'] == {**split, 'pretrain': sorted(split['pretrain'] + split['val']
                                                         + split['test'])}
  # A store written before the choice was recorded reads as it always did.
  del every['pretrain_excludes_eval']
  (tmp_path / 'transductive' / 'splits.json').write_text(json.dumps(every))
  store = case_store.CaseStore(tmp_path / 'transductive', cache_dir=tmp_path / 'cache')
  assert store.split('pretrain') == store.case_ids


def test_a_store_json_without_format_version_is_named(tmp_path, capsys):
  raw = _msd(tmp_path / 'raw', n=3, n_test=0)
  target = tmp_path / 'store'
  target.mkdir()
  (target / 'store.json').write_text('{"cases": {}}')
  assert prepare.main(['--raw_dir', str(raw), '--data_dir', str(target), '--quiet']) == 2
  assert '(its store.json has no format_version)' in capsys.readouterr().err


def test_folders_labels_that_are_not_classes_are_refused_at_prepare(tmp_path, capsys):
  aff = np.diag([1.5, 1.5, 2.0, 1.0])
  for i in range(3):
    label = np.zeros((12, 12, 10), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    label[0, 0, 0] = 255 if i == 1 else 0
    _save(tmp_path / 'raw' / 'images' / f'c{i}.nii.gz', _ct(seed=i), aff)
    _save(tmp_path / 'raw' / 'labels' / f'c{i}.nii.gz', label, aff)
  assert prepare.main(['--raw_dir', str(tmp_path / 'raw'), '--data_dir',
                       str(tmp_path / 'store'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path / 'raw' / 'labels' / 'c1.nii.gz'}: label value 255 "
                        '(255 often marks voxels to ignore) is not a class number')
  assert 'these files hold [1, 255]' in err and err.count('\n') == 1
  assert sorted(os.listdir(tmp_path)) == ['raw']


def test_a_float64_beyond_float32_is_named_without_a_numpy_warning(tmp_path):
  raw = _msd(tmp_path / 'raw', n=2, n_test=0)
  data = _ct(seed=1).astype(np.float64)
  data[1, 2, 3] = 1e300
  _save(raw / 'imagesTr' / 'case_1.nii.gz', data, np.diag([1.5, 1.5, 2.0, 1.0]))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    summary = prepare.prepare_dataset(raw, tmp_path / 'store', verbose=False)
  [(_, message)] = summary.skipped
  assert message.startswith('image has 1 NaN or Inf voxels (or values beyond the float32')
