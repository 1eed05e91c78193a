"""Tests of the synthetic CT phantom generators (pixssl_jax.data.phantoms, phantoms_clinical)."""

import gzip
import inspect
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pixssl_jax import config_files
from pixssl_jax.data import default_dataset
from pixssl_jax.data import phantom_geometry
from pixssl_jax.data import phantoms
from pixssl_jax.data import phantoms_clinical

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


# The 'clinical' family (pixssl_jax.data.phantoms_clinical).

CLINICAL_CASES = 3


@pytest.fixture(scope='module')
def clinical(tmp_path_factory) -> pathlib.Path:
  return phantoms.generate_dataset(tmp_path_factory.mktemp('c') / 'clin', CLINICAL_CASES, seed=0,
                                   shape_scale=SCALE, family='clinical')


def _lesion_voxel(affine: np.ndarray, centre_world) -> tuple[int, ...]:
  return tuple(np.rint(np.linalg.solve(affine, np.r_[centre_world, 1.])[:3]).astype(int))


def test_clinical_layout_labels_and_determinism(clinical, tmp_path):
  meta = json.loads((clinical / 'dataset.json').read_text())
  assert meta['labels'] == {str(k): v for k, v in phantoms.LABELS.items()}
  assert meta['phantom']['family'] == 'clinical' and meta['name'] == 'pixssl_phantom_clinical'
  assert meta['numTraining'] == CLINICAL_CASES == len(meta['training'])
  for i, case in enumerate(meta['phantom']['cases']):
    image, label, hu, lab = _load(clinical, f'case_{i:04d}')
    assert image.shape == label.shape == tuple(case['shape'])
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, label.affine)
    assert set(np.unique(lab)) == set(range(7)), i
    assert case['phase'] in phantoms_clinical.PHASES and case['kernel'] in ('soft', 'sharp')
    assert hu.min() >= phantoms.HU_MIN and hu.max() <= phantoms.HU_MAX
  again = phantoms.generate_dataset(tmp_path / 'again', CLINICAL_CASES, seed=0,
                                    shape_scale=SCALE, family='clinical')
  for rel in ['dataset.json'] + [f'{d}/case_{i:04d}.nii.gz' for d in ('imagesTr', 'labelsTr')
                                 for i in range(CLINICAL_CASES)]:
    assert (again / rel).read_bytes() == (clinical / rel).read_bytes(), rel
  other = phantoms.generate_dataset(tmp_path / 'other', 1, seed=1, shape_scale=SCALE,
                                    family='clinical')
  a, b = _load(clinical, 'case_0000')[2], _load(other, 'case_0000')[2]
  assert a.shape != b.shape or not np.array_equal(a, b)
  # The basic family of the same seed is a different dataset.
  basic = phantoms.generate_dataset(tmp_path / 'basic', 1, seed=0, shape_scale=SCALE)
  assert (basic / 'imagesTr/case_0000.nii.gz').read_bytes() != (
      clinical / 'imagesTr/case_0000.nii.gz').read_bytes()
  with pytest.raises(ValueError, match='family'):
    phantoms.generate_dataset(tmp_path / 'x', 1, shape_scale=SCALE, family='nope')


def test_clinical_contrast_phase_changes_hu_not_anatomy():
  out = {}
  for phase in phantoms_clinical.PHASES:
    hu, label, affine, meta = phantoms_clinical.render_case(np.random.default_rng([0, 0]), SCALE,
                                                            'RAS', phase=phase)
    assert meta['phase'] == phase
    out[phase] = (hu, label, affine)
  nc, art, pv = (out[p] for p in phantoms_clinical.PHASES)
  for hu, label, affine in (art, pv):  # Same anatomy and grid, only the HU differ.
    np.testing.assert_array_equal(label, nc[1])
    np.testing.assert_array_equal(affine, nc[2])
  label = nc[1]
  med = {p: {k: np.median(out[p][0][label == k]) for k in range(1, 6)} for p in out}
  aorta, kidney, liver, spleen = 5, 4, 1, 2
  assert med['arterial'][aorta] > med['portal_venous'][aorta] + 50 > med['non_contrast'][aorta] + 100
  assert med['arterial'][kidney] > med['non_contrast'][kidney] + 50
  assert med['portal_venous'][kidney] > med['non_contrast'][kidney] + 80
  assert med['portal_venous'][liver] > med['arterial'][liver] + 20
  assert med['arterial'][spleen] > med['arterial'][liver] + 15  # Reordered by the phase.
  assert med['non_contrast'][aorta] < 60


def test_clinical_organ_hu_overlap(clinical):
  # Within the portal venous phase, liver and spleen overlap; across phases, one organ's HU
  # covers another's (what makes intensity alone useless).
  ranges = phantoms_clinical._PHASE_HU  # pylint: disable=protected-access
  nc, art, pv = range(3)
  overlap = lambda a, b: min(a[1], b[1]) - max(a[0], b[0])
  assert overlap(ranges['liver'][pv], ranges['spleen'][pv]) > 0
  assert overlap(ranges['liver'][pv], ranges['pancreas'][pv]) > 0
  assert overlap(ranges['aorta'][pv], ranges['cortex_k'][pv]) > 0
  assert overlap(ranges['ivc'][pv], ranges['aorta'][pv]) > 0
  assert overlap(ranges['spleen'][art], ranges['pancreas'][art]) > 0
  assert overlap(ranges['spleen'][nc], ranges['aorta'][nc]) > 0


def test_clinical_distractors_are_background(monkeypatch):
  # Records which painter last covered each voxel by at least half (what sets its label):
  # everything the gut and pancreas painters (stomach, bowel, pancreas, its veins) still own at
  # the end must be background.
  calls = []
  real = phantom_geometry.Canvas.paint

  def paint(self, lo, hi, shape, hu, label=None):
    real(self, lo, hi, shape, hu, label)
    covered = np.zeros(self.label.shape, bool)
    sl = self.window(lo, hi)
    if sl is not None:
      x, y, z = self.xa[sl[0], sl[1]], self.ya[sl[0], sl[1]], self.za[..., sl[2]]
      f = np.broadcast_to(shape(x, y, z), covered[sl].shape).astype(np.float32)
      covered[sl] = phantom_geometry.occupancy(f) >= 0.5
    calls.append((inspect.stack()[1].function, label, covered))

  monkeypatch.setattr(phantom_geometry.Canvas, 'paint', paint)
  hu, label, _, meta = phantoms_clinical.render_case(np.random.default_rng([0, 4]), SCALE, 'RAS',
                                                     phase='portal_venous')
  assert meta['gallbladder'] and meta['oral_contrast']
  owner = np.full(label.shape, -1)
  for i, (_, _, changed) in enumerate(calls):
    owner[changed] = i
  distractors = {'hollow': 0, 'paint_pancreas': 0}
  for i, (caller, lab, _) in enumerate(calls):
    if caller in distractors:
      assert lab == 0, caller
      mine = owner == i
      distractors[caller] += mine.sum()
      assert (label[mine] == 0).all(), caller
  assert min(distractors.values()) > 50, distractors
  # The gallbladder (in the liver's fossa) and the IVC are painted after the liver, unlabelled.
  gallbladder = [i for i, (c, lab, _) in enumerate(calls)
                 if c == 'paint_solid_organs' and lab == 0]
  assert gallbladder and all((label[owner == i] == 0).all() for i in gallbladder)


def test_clinical_lesions_inside_organs_labelled_as_organ(clinical):
  seen = set()
  for i, case in enumerate(json.loads((clinical / 'dataset.json').read_text())['phantom']['cases']):
    image, _, hu, label = _load(clinical, f'case_{i:04d}')
    for lesion in case['lesions']:
      v = _lesion_voxel(image.affine, lesion['centre_world'])
      assert label[v] == lesion['label'] == {'liver': 1, 'spleen': 2, 'kidney_left': 3,
                                            'kidney_right': 4}[lesion['organ']], lesion
      seen.add(lesion['organ'])
      if lesion['kind'] == 'cyst' and lesion['radius_mm'] >= 12:  # Clearly darker than the organ.
        organ = np.median(hu[label == lesion['label']])
        assert hu[v] < organ - 15, (lesion, organ, hu[v])
  assert 'liver' in seen


def test_clinical_store_names_and_cli(tmp_path, capsys):
  basic = default_dataset.phantom_store_dir(tmp_path, 40, 0, spacing=(3.0, 3.0, 4.0))
  assert pathlib.Path(basic).name == 'phantoms-v2-n40-s0-sp3_3_4'
  assert default_dataset.phantom_store_dir(tmp_path, 40, 0, spacing=(3.0, 3.0, 4.0),
                                           family='basic') == basic
  clin = default_dataset.phantom_store_dir(tmp_path, 40, 0, spacing=(3.0, 3.0, 4.0),
                                           family='clinical')
  assert pathlib.Path(clin).name == (f'phantoms-clinical-{phantoms_clinical.GENERATOR_VERSION}'
                                     '-n40-s0-sp3_3_4')
  assert default_dataset.PHANTOM_FAMILIES['clinical'] == phantoms_clinical.GENERATOR_VERSION
  assert set(default_dataset.PHANTOM_FAMILIES) == set(phantoms.FAMILIES)
  with pytest.raises(ValueError, match='family'):
    default_dataset.phantom_store_dir(tmp_path, family='nope')
  out = tmp_path / 'cli'
  phantoms.main(['--out', str(out), '--num_cases', '1', '--shape_scale', '0.25',
                 '--family', 'clinical'])
  assert 'wrote 1 phantoms' in capsys.readouterr().out
  assert json.loads((out / 'dataset.json').read_text())['phantom']['family'] == 'clinical'


def test_config_field_defaults_to_basic():
  for name in ('pretrain', 'finetune'):
    for preset in ('tiny', 'demo'):
      assert config_files.load(name, preset).data.phantom_family == 'basic'
