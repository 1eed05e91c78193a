"""Tests of CaseStore (the .npy cache over the TFDS store) and the default phantom store."""
import json
import os
import pickle
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax.data import case_store
from pixssl_jax.data import default_dataset
from pixssl_jax.data import nifti_io
from pixssl_jax.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACING, WINDOW = (1.5, 1.5, 2.0), (-175.0, 250.0)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(store dir, raw dir, {case id: PreprocessedCase}) for 3 labelled + 1 unlabelled case."""
  root = tmp_path_factory.mktemp('cs')
  raw = root / 'raw'
  rng = np.random.default_rng(0)
  # LPS-stored and anisotropic, so the store really reorients and resamples.
  aff = np.diag([-0.9, -0.9, 3.0, 1.0])
  for sub in ('imagesTr', 'labelsTr', 'imagesTs'):
    (raw / sub).mkdir(parents=True)
  for i in range(3):
    shape = (24 + i, 22, 9)
    nib.save(nib.Nifti1Image(rng.normal(0, 300, shape).astype(np.float32), aff),
             str(raw / 'imagesTr' / f'c{i}.nii.gz'))
    nib.save(nib.Nifti1Image(rng.integers(0, 3, shape).astype(np.uint8), aff),
             str(raw / 'labelsTr' / f'c{i}.nii.gz'))
  nib.save(nib.Nifti1Image(rng.normal(0, 300, (20, 20, 8)).astype(np.float32), aff),
           str(raw / 'imagesTs' / 'u0.nii.gz'))
  (raw / 'dataset.json').write_text(json.dumps(
      {'labels': {'0': 'background', '1': 'liver', '2': 'spleen'}}))
  summary = prepare.prepare_dataset(raw, root / 'store', spacing=SPACING, hu_window=WINDOW,
                                    verbose=False)
  assert summary.written == ['c0', 'c1', 'c2', 'u0'] and not summary.skipped
  names = {0: 'background', 1: 'liver', 2: 'spleen'}
  expected = {f'c{i}': nifti_io.preprocess_case(
      raw / 'imagesTr' / f'c{i}.nii.gz', raw / 'labelsTr' / f'c{i}.nii.gz', spacing=SPACING,
      hu_window=WINDOW, label_names=names) for i in range(3)}
  expected['u0'] = nifti_io.preprocess_case(raw / 'imagesTs' / 'u0.nii.gz', spacing=SPACING,
                                            hu_window=WINDOW)
  return root / 'store', raw, expected


def test_store_returns_the_preprocessed_voxels_and_metadata(prepared):
  data_dir, _, expected = prepared
  store = case_store.CaseStore(data_dir)
  assert store.case_ids == ['c0', 'c1', 'c2', 'u0']
  # Pre-training sees the training cases and the unlabelled one, never val or test.
  assert store.split('pretrain') == sorted(store.split('train_100') + ['u0'])
  assert store.hu_window == WINDOW and store.spacing == SPACING
  assert store.label_names == {0: 'background', 1: 'liver', 2: 'spleen'}
  for case_id, case in expected.items():
    image = store.image(case_id)
    assert isinstance(image, np.memmap) and image.dtype == np.int16
    np.testing.assert_array_equal(image, case.image)
    meta = store.meta(case_id)
    np.testing.assert_allclose(meta['affine'], case.affine)
    np.testing.assert_allclose(meta['original_affine'], case.original_affine)
    assert meta['original_shape'] == case.original_shape
    assert meta['shape'] == case.image.shape and meta['spacing'] == SPACING
    np.testing.assert_allclose(meta['original_spacing'], (0.9, 0.9, 3.0), rtol=1e-6)
    if case.label is None:
      with pytest.raises(ValueError, match="case 'u0' .* has no label"):
        store.label(case_id)
    else:
      assert store.label(case_id).dtype == np.uint8
      np.testing.assert_array_equal(store.label(case_id), case.label)
  with pytest.raises(KeyError, match="'nope' is not a case"):
    store.image('nope')
  with pytest.raises(ValueError, match="no split 'train_50'"):
    store.split('train_50')


def test_cache_is_built_once_and_reused(prepared, tmp_path):
  data_dir, _, expected = prepared
  cache = tmp_path / 'cache'
  store = case_store.CaseStore(data_dir, cache_dir=cache)
  assert not store.cache_is_complete()
  assert store.ensure_cache() is True
  files = sorted(os.listdir(cache))
  assert files == ['c0.image.npy', 'c0.label.npy', 'c1.image.npy', 'c1.label.npy',
                   'c2.image.npy', 'c2.label.npy', 'cache.json', 'u0.image.npy']
  stamps = {f: os.stat(cache / f).st_mtime_ns for f in files}
  again = case_store.CaseStore(data_dir, cache_dir=cache)
  assert again.ensure_cache() is False
  np.testing.assert_array_equal(again.image('c1'), expected['c1'].image)
  assert {f: os.stat(cache / f).st_mtime_ns for f in files} == stamps
  # A cache left by another build of the store is not trusted.
  (cache / 'cache.json').write_text(json.dumps({'fingerprint': 'other-build'}))
  assert case_store.CaseStore(data_dir, cache_dir=cache).ensure_cache() is True


def test_repr_is_stable_and_store_pickles(prepared):
  data_dir, _, expected = prepared
  store = case_store.CaseStore(data_dir)
  store.image('c0')
  assert repr(store) == repr(case_store.CaseStore(data_dir))
  assert repr(store) == (f"CaseStore(data_dir='{data_dir}', "
                         f"cache_dir='{os.path.join(data_dir, 'npy_cache')}')")
  clone = pickle.loads(pickle.dumps(store))  # what grain worker processes receive
  assert repr(clone) == repr(store)
  np.testing.assert_array_equal(clone.image('c2'), expected['c2'].image)


def test_concurrent_cache_builds_are_safe(prepared, tmp_path):
  data_dir, _, expected = prepared
  code = ('import sys; from pixssl_jax.data.case_store import CaseStore; '
          'CaseStore(sys.argv[1], cache_dir=sys.argv[2]).ensure_cache()')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(data_dir), str(tmp_path / 'c')],
                            cwd=REPO, stderr=subprocess.PIPE) for _ in range(2)]
  for p in procs:
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
  assert not [f for f in os.listdir(tmp_path / 'c') if '.tmp-' in f]
  store = case_store.CaseStore(data_dir, cache_dir=tmp_path / 'c')
  assert store.ensure_cache() is False
  np.testing.assert_array_equal(store.label('c0'), expected['c0'].label)


def test_missing_or_bad_store_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'store\.json: no store here'):
    case_store.CaseStore(tmp_path)
  (tmp_path / 'store.json').write_text(json.dumps({'format_version': 99}))
  with pytest.raises(ValueError, match='format_version 99 is not supported'):
    case_store.CaseStore(tmp_path)


def test_remote_store_caches_locally(monkeypatch, tmp_path):
  monkeypatch.setenv('PIXSSL_CACHE', str(tmp_path))
  a = case_store.default_cache_dir('gs://bucket/stores/btcv')
  b = case_store.default_cache_dir('gs://bucket/stores/msd')
  assert os.path.dirname(a) == os.path.join(str(tmp_path), 'npy_cache') and a != b
  assert a == case_store.default_cache_dir('gs://bucket/stores/btcv')
  assert case_store.default_cache_dir('/data/store') == '/data/store/npy_cache'


def _have_phantoms() -> bool:
  try:
    from pixssl_jax.data import phantoms  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(phantoms, 'generate_dataset')


_HAVE_PHANTOMS = _have_phantoms()


@pytest.mark.skipif(not _HAVE_PHANTOMS, reason='pixssl_jax/data/phantoms.py not written yet')
def test_phantoms_prepare_case_store_end_to_end(tmp_path, capsys):
  path = default_dataset.ensure_phantom_store(tmp_path, num_cases=3, seed=1, shape_scale=0.25)
  assert path == os.path.join(tmp_path, 'phantoms-v2-n3-s1-x0.25', 'store')
  assert 'generating 3 basic phantom CT cases' in capsys.readouterr().out
  store = case_store.CaseStore(path)
  assert len(store.case_ids) == 3 and store.label_names[1] == 'liver'
  assert store.split('pretrain') == store.split('train_100')  # every phantom is labelled
  assert sorted(os.listdir(tmp_path)) == ['phantoms-v2-n3-s1-x0.25']  # no temp dirs left
  case_id = store.split('train_100')[0]
  image, label = store.image(case_id), store.label(case_id)
  assert image.dtype == np.int16 and label.shape == image.shape
  assert WINDOW[0] <= image.min() < image.max() <= WINDOW[1] and label.max() >= 1
  stamp = os.stat(os.path.join(path, 'store.json')).st_mtime_ns
  assert default_dataset.ensure_phantom_store(tmp_path, num_cases=3, seed=1,
                                              shape_scale=0.25) == path
  assert os.stat(os.path.join(path, 'store.json')).st_mtime_ns == stamp
  assert capsys.readouterr().out == ''  # second call: nothing generated, nothing printed


def _fake_phantoms(winner_store=None):
  """A stand-in generator writing 2 tiny MSD cases; optionally a rival finishes meanwhile."""

  def generate_dataset(out_dir, num_cases, seed=0, shape_scale=1.0, family='basic'):
    rng = np.random.default_rng(seed)
    for sub in ('imagesTr', 'labelsTr'):
      os.makedirs(os.path.join(out_dir, sub))
    for i in range(num_cases):
      aff = np.diag([2.0, 2.0, 2.0, 1.0])
      nib.save(nib.Nifti1Image(rng.normal(0, 100, (8, 8, 8)).astype(np.float32), aff),
               os.path.join(out_dir, 'imagesTr', f'p{i}.nii.gz'))
      nib.save(nib.Nifti1Image((rng.random((8, 8, 8)) > 0.5).astype(np.uint8), aff),
               os.path.join(out_dir, 'labelsTr', f'p{i}.nii.gz'))
    with open(os.path.join(out_dir, 'dataset.json'), 'w') as f:
      json.dump({'labels': {'0': 'background', '1': 'liver'}}, f)
    if winner_store is not None:  # another process completes its store first
      os.makedirs(winner_store)
      with open(os.path.join(winner_store, 'store.json'), 'w') as f:
        f.write('{"winner": true}')
    return out_dir

  return types.SimpleNamespace(generate_dataset=generate_dataset)


def test_ensure_phantom_store_builds_once_and_yields_to_a_faster_rival(tmp_path, monkeypatch):
  import pixssl_jax.data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pixssl_jax.data, 'phantoms', _fake_phantoms(), raising=False)
  monkeypatch.setitem(sys.modules, 'pixssl_jax.data.phantoms', pixssl_jax.data.phantoms)
  path = default_dataset.ensure_phantom_store(tmp_path, num_cases=2, seed=0, verbose=False)
  assert path == os.path.join(tmp_path, 'phantoms-v2-n2-s0', 'store')
  assert case_store.CaseStore(path).case_ids == ['p0', 'p1']
  assert sorted(os.listdir(os.path.join(tmp_path, 'phantoms-v2-n2-s0'))) == ['raw', 'store']

  rival_dir = os.path.join(tmp_path, 'phantoms-v2-n2-s5')
  fake = _fake_phantoms(winner_store=os.path.join(rival_dir, 'store'))
  monkeypatch.setattr(pixssl_jax.data, 'phantoms', fake)
  monkeypatch.setitem(sys.modules, 'pixssl_jax.data.phantoms', fake)
  path = default_dataset.ensure_phantom_store(tmp_path, num_cases=2, seed=5, verbose=False)
  assert path == os.path.join(rival_dir, 'store')
  with open(os.path.join(path, 'store.json')) as f:
    assert json.load(f) == {'winner': True}  # the rival's store is used, not replaced
  assert sorted(os.listdir(tmp_path)) == ['phantoms-v2-n2-s0', 'phantoms-v2-n2-s5']
