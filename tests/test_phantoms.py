"""Tests of the synthetic CT phantom generator (pixssl_jax.data.phantoms)."""

import gzip
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pixssl_jax.data import phantoms

SCALE = 0.4
NUM_CASES = 3


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> pathlib.Path:
  return phantoms.generate_dataset(tmp_path_factory.mktemp('a') / 'ph', NUM_CASES, seed=0,
                                   shape_scale=SCALE)


def _load(root: pathlib.Path, case: str):
  image = nib.load(root / 'imagesTr' / f'{case}.nii.gz')
  label = nib.load(root / 'labelsTr' / f'{case}.nii.gz')
  return image, label, image.get_fdata(), np.asarray(label.dataobj)


def _raw_header(path: pathlib.Path) -> nib.Nifti1Header:
  with gzip.open(path) as f:
    return nib.Nifti1Header.from_fileobj(f)


def _world_centroid(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return (affine @ np.r_[np.argwhere(mask).mean(0), 1.])[:3]


def test_layout_and_dataset_json(dataset):
  meta = json.loads((dataset / 'dataset.json').read_text())
  assert meta['modality'] == {'0': 'CT'}
  assert meta['labels'] == {'0': 'background', '1': 'liver', '2': 'spleen', '3': 'kidney_left',
                            '4': 'kidney_right', '5': 'aorta', '6': 'vertebrae'}
  assert meta['numTraining'] == NUM_CASES == len(meta['training'])
  assert meta['name']
  for i, entry in enumerate(meta['training']):
    assert entry['image'] == f'./imagesTr/case_{i:04d}.nii.gz'
    assert entry['label'] == f'./labelsTr/case_{i:04d}.nii.gz'
    image, label = nib.load(dataset / entry['image']), nib.load(dataset / entry['label'])
    assert image.shape == label.shape == tuple(meta['phantom']['cases'][i]['shape'])
    np.testing.assert_allclose(image.affine, label.affine)
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert image.header['qform_code'] == image.header['sform_code'] == 1
  assert sorted(p.name for p in (dataset / 'imagesTr').iterdir()) == sorted(
      p.name for p in (dataset / 'labelsTr').iterdir())
  # No temporary build directory left beside the dataset.
  assert [p.name for p in dataset.parent.iterdir()] == ['ph']


def test_deterministic_and_seed_dependent(dataset, tmp_path):
  again = phantoms.generate_dataset(tmp_path / 'again', NUM_CASES, seed=0, shape_scale=SCALE)
  for rel in ['dataset.json'] + [f'{d}/case_{i:04d}.nii.gz' for d in ('imagesTr', 'labelsTr')
                                 for i in range(NUM_CASES)]:
    assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel
  # Case i does not depend on how many cases are generated.
  one = phantoms.generate_dataset(tmp_path / 'one', 1, seed=0, shape_scale=SCALE)
  assert ((one / 'imagesTr/case_0000.nii.gz').read_bytes()
          == (dataset / 'imagesTr/case_0000.nii.gz').read_bytes())
  other = phantoms.generate_dataset(tmp_path / 'other', 1, seed=1, shape_scale=SCALE)
  a, b = _load(dataset, 'case_0000')[2], _load(other, 'case_0000')[2]
  assert a.shape != b.shape or not np.array_equal(a, b)


def test_labels_and_tissue_hu(dataset):
  for i in range(NUM_CASES):
    _, _, hu, label = _load(dataset, f'case_{i:04d}')
    assert set(np.unique(label)) == set(range(7)), i
    medians = {k: np.median(hu[label == k]) for k in range(1, 7)}
    assert 30 <= medians[1] <= 70, medians  # Liver.
    assert medians[6] > 250, medians  # Vertebrae (cancellous core, bright cortex).
    assert medians[1] > medians[2] > medians[3] - 15 and medians[1] > medians[4], medians
    assert abs(np.median(hu[:3, :3, :]) + 1000) < 15  # Air in the FOV corners.
    assert hu.min() >= phantoms.HU_MIN and hu.max() <= phantoms.HU_MAX
    # Fat (about -100 HU) is the commonest body tissue below 0 HU.
    counts, edges = np.histogram(hu[hu > -500], bins=np.arange(-200, 1, 10))
    assert -125 <= edges[np.argmax(counts)] + 5 <= -75, counts


def test_noise_std_in_flat_region(dataset):
  cases = json.loads((dataset / 'dataset.json').read_text())['phantom']['cases']
  for i, case in enumerate(cases):
    _, _, hu, label = _load(dataset, f'case_{i:04d}')
    core = ndimage.binary_erosion(label == 1, iterations=2)  # Liver interior: flat tissue.
    assert core.sum() > 200
    std = hu[core].std()
    assert 10 <= case['noise_sigma_hu'] <= 25
    assert 9 <= std <= 26, std
    assert abs(std - case['noise_sigma_hu']) < 0.15 * case['noise_sigma_hu'] + 1, (std, case)


def test_left_right_in_world_coordinates(dataset):
  codes = []
  for i in range(NUM_CASES):
    image, _, hu, label = _load(dataset, f'case_{i:04d}')
    codes.append(nib.aff2axcodes(image.affine))
    centre = _world_centroid(image.affine, hu > -500)  # Body.
    c = {k: _world_centroid(image.affine, label == k) for k in range(1, 7)}
    assert c[1][0] > centre[0] + 20, (codes[-1], c[1], centre)  # Liver on the patient's right.
    assert c[2][0] < centre[0] - 20, (codes[-1], c[2], centre)  # Spleen on the left.
    assert c[4][0] > c[6][0] > c[3][0], codes[-1]  # Right kidney, spine, left kidney.
    assert c[5][0] < c[6][0] and c[5][1] > c[6][1], codes[-1]  # Aorta anterior-left.
    assert c[1][2] > c[4][2]  # Liver (mostly) above the right kidney.
  assert ('R', 'A', 'S') in codes and ('L', 'P', 'S') in codes


def test_spacing_and_shape_ranges(dataset):
  shapes = set()
  for i in range(NUM_CASES):
    image = nib.load(dataset / 'imagesTr' / f'case_{i:04d}.nii.gz')
    dx, dy, dz = (float(v) for v in image.header.get_zooms())
    assert dx == pytest.approx(dy)
    assert 1.5 / SCALE <= dx <= 3.3 / SCALE, dx  # FOV (body width + 20..80 mm) / matrix.
    assert 1.5 / SCALE <= dz <= 5.0 / SCALE, dz
    nx, ny, nz = image.shape
    assert nx == ny and 0.85 * 160 * SCALE - 1 <= nx <= 1.15 * 160 * SCALE + 1
    assert round(64 * SCALE) <= nz <= round(96 * SCALE)
    shapes.add(image.shape)
  assert len(shapes) > 1


def test_scl_slope_inter_cases_read_as_hu(dataset):
  kinds = set()
  for i in range(NUM_CASES):
    path = dataset / 'imagesTr' / f'case_{i:04d}.nii.gz'
    header = _raw_header(path)
    image = nib.load(path)
    raw = np.asarray(image.dataobj.get_unscaled())
    hu = image.get_fdata()
    if header['scl_inter'] == -1024:
      assert header['scl_slope'] == 1 and raw.min() >= 0
      np.testing.assert_array_equal(hu, raw.astype(np.float64) - 1024)
      kinds.add('scaled')
    else:
      assert header['scl_inter'] == 0 and header['scl_slope'] in (0, 1)
      np.testing.assert_array_equal(hu, raw)
      kinds.add('plain')
    assert abs(np.median(hu[:3, :3, :]) + 1000) < 15
  assert kinds == {'scaled', 'plain'}


def test_bad_arguments_and_existing_output(dataset, tmp_path):
  with pytest.raises(FileExistsError, match='not an empty directory'):
    phantoms.generate_dataset(dataset, 1, shape_scale=SCALE)
  with pytest.raises(ValueError, match='num_cases'):
    phantoms.generate_dataset(tmp_path / 'x', 0)
  with pytest.raises(ValueError, match='seed'):
    phantoms.generate_dataset(tmp_path / 'x', 1, seed=-1)
  with pytest.raises(ValueError, match='shape_scale'):
    phantoms.generate_dataset(tmp_path / 'x', 1, shape_scale=0.0)
  assert not (tmp_path / 'x').exists()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
  real = phantoms._write_case
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(phantoms, '_write_case', failing)
  with pytest.raises(KeyboardInterrupt):
    phantoms.generate_dataset(tmp_path / 'ph', 3, shape_scale=0.25)
  assert list(tmp_path.iterdir()) == []


def test_cli_into_empty_directory(tmp_path, capsys):
  out = tmp_path / 'cli'
  out.mkdir()  # An empty destination is accepted and replaced.
  phantoms.main(['--out', str(out), '--num_cases', '1', '--seed', '5', '--shape_scale', '0.25'])
  assert 'wrote 1 phantoms' in capsys.readouterr().out
  assert json.loads((out / 'dataset.json').read_text())['phantom']['seed'] == 5
  assert (out / 'labelsTr' / 'case_0000.nii.gz').is_file()
