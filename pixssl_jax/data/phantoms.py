r"""Synthetic abdominal CT phantoms: the embedded default dataset of pixssl_jax.

Writes the Medical Segmentation Decathlon layout (`imagesTr/`, `labelsTr/`, `dataset.json`):

  python -m pixssl_jax.data.phantoms --out /tmp/phantoms --num_cases 40 --seed 0

The 'basic' family described here is rendered by `pixssl_jax.data.phantoms_basic`;
`--family clinical` renders the harder one of `pixssl_jax.data.phantoms_clinical` (contrast
phases, lesions, distractors, wide pose). Both go through the writer here.

Anatomy is built in patient world millimetres (nibabel's RAS+: +x patient Right, +y Anterior,
+z Superior) and only then sampled on each case's voxel grid, so it is correct whatever the
header orientation. Per case: smooth random shape (implicit surfaces = ellipsoids blended and
displaced by low-frequency random fields), size and position; body habitus and fat thickness;
voxel grid, spacing and FOV; RAS- or LPS-ordered voxels; int16 stored with or without
scl_slope/scl_inter; Gaussian noise.

Labels (MSD style, uint8):

  | value | name         | where (world)                                     |
  | ----- | ------------ | ------------------------------------------------- |
  | 0     | background   | everything else (incl. IVC, iliac arteries, discs) |
  | 1     | liver        | right upper quadrant (x > body centre), left lobe  |
  | 2     | spleen       | left (x < centre), posterior, upper               |
  | 3     | kidney_left  | x < spine, retroperitoneal                        |
  | 4     | kidney_right | x > spine, a little lower than the left           |
  | 5     | aorta        | just anterior (+y) and left (-x) of the spine, above the bifurcation |
  | 6     | vertebrae    | vertebral bodies and posterior elements (bone)    |

Non-contrast HU, drawn per case (`phantoms_basic._sample_tissues`): air -1000, lung -850,
fat -100, skin 32, muscle 54, liver 63, spleen 46, kidney 30, blood 41, bowel wall 38, gas -950,
disc 90, cancellous bone 330, cortex 850, posterior elements 550. Mean gaps: liver-spleen 17,
spleen-kidney 16, liver-muscle 9 HU; organs also differ by shape and position.

Grid (shape_scale=1): about 160x160x80 voxels (+-15% in-plane, 64-96 slices). Slice spacing
1.5-5 mm. In-plane spacing is the field of view (adult body width + 20..80 mm, 300-430 mm)
divided by the matrix, i.e. 1.6-3.2 mm: an adult abdomen cannot fit 160 voxels of 0.6-1.0 mm
(that is a 96-160 mm FOV). `shape_scale` scales the voxel counts and divides the spacings, so
the anatomy in mm stays the same. Partial volume: each structure's occupancy of a voxel is the
box-filter fraction from its signed distance and the voxel's extent along the surface normal,
then an in-plane Gaussian PSF (sigma 0.5 voxel) that also colours the Gaussian noise
(std 10-25 HU per case after the PSF).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import nibabel as nib
import numpy as np

from pixssl_jax.data import phantoms_basic
from pixssl_jax.data import phantoms_clinical

LABELS = {0: 'background', 1: 'liver', 2: 'spleen', 3: 'kidney_left', 4: 'kidney_right',
          5: 'aorta', 6: 'vertebrae'}
HU_MIN, HU_MAX = -1024, 3071  # The 12-bit range CT scanners store.
FAMILIES = ('basic', 'clinical')
def _save_nifti(data: np.ndarray, affine: np.ndarray, path: pathlib.Path,
                slope_inter: tuple[float, float] | None = None) -> None:
  """Writes a NIfTI-1 file with qform = sform = affine (scanner frame, mm)."""
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm', 'sec')
  img.header['descrip'] = b'pixssl_jax synthetic CT phantom'
  if slope_inter is not None:
    img.header.set_slope_inter(*slope_inter)
  img.to_filename(path)


def _renderer(family: str):
  """The function that renders one case of `family`."""
  if family == 'basic':
    return phantoms_basic.render_case
  return phantoms_clinical.render_case


def _write_case(root: pathlib.Path, case_id: str, rng, shape_scale: float,
                index: int, family: str = 'basic') -> dict:
  """Renders case `index` and writes its image and label; returns its metadata."""
  # Both header orientations and both storage conventions occur in any 4 consecutive cases.
  orientation = 'RAS' if index % 2 == 0 else 'LPS'
  scaled = index % 4 in (1, 2)
  hu, label, affine, meta = _renderer(family)(rng, shape_scale, orientation)
  hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
  if scaled:  # Stored = HU + 1024 >= 0, as many scanners write it; readers apply the scaling.
    _save_nifti((hu + 1024).astype(np.int16), affine, root / 'imagesTr' / f'{case_id}.nii.gz',
                (1., -1024.))
  else:
    _save_nifti(hu, affine, root / 'imagesTr' / f'{case_id}.nii.gz')
  _save_nifti(label, affine, root / 'labelsTr' / f'{case_id}.nii.gz')
  missing = sorted(set(LABELS) - set(np.unique(label).tolist()))
  if missing:  # The grid sampling is meant to always cover every organ.
    raise RuntimeError(f'phantom {case_id}: labels {missing} not rendered (shape_scale '
                       f'{shape_scale} too small?)')
  return dict(id=case_id, scl_slope_inter=[1., -1024.] if scaled else None, **meta)


def generate_dataset(out_dir: str | os.PathLike, num_cases: int, seed: int = 0,
                     shape_scale: float = 1.0, family: str = 'basic') -> pathlib.Path:
  """Generates `num_cases` labelled CT phantoms in the Medical Segmentation Decathlon layout.

  The dataset is built in a temporary directory beside `out_dir` and renamed into place, so
  an interrupted run leaves no partial `out_dir`. The same (num_cases, seed, shape_scale)
  gives byte-identical files; case i does not depend on num_cases.

  Args:
    out_dir: destination; must not exist or be an empty directory.
    num_cases: number of cases, >= 1.
    seed: non-negative integer seed.
    shape_scale: scales the voxel counts (1.0: about 160x160x80), anatomy stays in mm.
    family: 'basic' (this module) or 'clinical' (`phantoms_clinical`).

  Returns:
    The path of the dataset (`out_dir`), holding `imagesTr/case_XXXX.nii.gz`,
    `labelsTr/case_XXXX.nii.gz` and `dataset.json`.
  """
  out = pathlib.Path(out_dir)
  if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
    raise ValueError(f'num_cases must be a positive integer, got {num_cases!r}')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')
  if not 0.1 <= shape_scale <= 4.0:
    raise ValueError(f'shape_scale must be in [0.1, 4.0], got {shape_scale!r}')
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f'{out} already exists and is not an empty directory; remove it or '
                          'choose another --out')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    for sub in ('imagesTr', 'labelsTr'):
      (tmp / sub).mkdir()
    cases = []
    for i in range(num_cases):
      start = time.perf_counter()
      rng = np.random.default_rng([int(seed), i])
      cases.append(_write_case(tmp, f'case_{i:04d}', rng, float(shape_scale), i, family))
      logging.info('phantom %d/%d %s shape %s spacing %s (%.2f s)', i + 1, num_cases,
                   cases[-1]['orientation'], cases[-1]['shape'], cases[-1]['spacing'],
                   time.perf_counter() - start)
    dataset = {
        'name': 'pixssl_phantom',
        'description': 'Synthetic non-contrast abdominal CT phantoms (pixssl_jax.data.phantoms)',
        'reference': 'pixssl_jax', 'licence': 'CC0', 'release': '1.0',
        'tensorImageSize': '3D',
        'modality': {'0': 'CT'},
        'labels': {str(k): v for k, v in LABELS.items()},
        'numTraining': num_cases, 'numTest': 0,
        'training': [{'image': f'./imagesTr/{c["id"]}.nii.gz',
                      'label': f'./labelsTr/{c["id"]}.nii.gz'} for c in cases],
        'test': [],
        'phantom': {'seed': int(seed), 'shape_scale': float(shape_scale), 'cases': cases},
    }
    if family != 'basic':  # The basic family's dataset.json stays as it always was.
      dataset['name'] = f'pixssl_phantom_{family}'
      dataset['description'] = ('Synthetic multi-phase abdominal CT phantoms '
                                f'(pixssl_jax.data.phantoms_{family})')
      dataset['phantom']['family'] = family
    (tmp / 'dataset.json').write_text(json.dumps(dataset, indent=2) + '\n')
    os.chmod(tmp, 0o755)  # mkdtemp makes it private.
    if out.exists():
      out.rmdir()  # Empty (checked above); a directory rename needs the target gone.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output directory (must not exist)')
  parser.add_argument('--num_cases', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shape_scale', type=float, default=1.0)
  parser.add_argument('--family', default='basic', choices=FAMILIES,
                      help="'basic' (this module) or 'clinical' (phantoms_clinical)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  start = time.perf_counter()
  path = generate_dataset(args.out, args.num_cases, args.seed, args.shape_scale, args.family)
  print(f'wrote {args.num_cases} phantoms to {path} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
  main()
