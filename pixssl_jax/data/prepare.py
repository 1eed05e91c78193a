"""Raw NIfTI folder -> preprocessed TFDS ArrayRecord store (`STORE/`), CLI and Python API.

    python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE \
        [--spacing 1.5,1.5,2.0] [--hu_window -175,250] [--seed 0] [--strict] [--overwrite]

Raw layouts read (auto-detected, or `--images_dir`/`--labels_dir`):
- MSD: `imagesTr/` + optional `labelsTr/` + `dataset.json`; `imagesTs/` images are unlabelled.
- BTCV: `img/imgNNNN.nii.gz` + `label/labelNNNN.nii.gz` (or `Training/` + `Testing/` above).
- Any `images/` + `labels/` folders whose files have matching names.
Images without a label are kept for pre-training only.

Output (`STORE/`): `tfds/ct_volumes/1.0.0/` (the ArrayRecord store, see `ct_dataset.py`),
`store.json` (spacing, HU window, label names, per-case geometry) and `splits.json`. The
store is built in a temporary folder beside `STORE` and renamed at the end, so a failed run
leaves nothing behind. Bad cases are skipped with a reason (or stop the run with `--strict`).
"""
import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence

from etils import epath
import numpy as np

from pixssl_jax.data import ct_dataset
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.data import nifti_io

# Re-exported: callers catch `prepare.CaseError` for any bad case or folder.
CaseError = nifti_io.CaseError

STORE_FORMAT_VERSION = 1
TFDS_SUBDIR = 'tfds'


class PrepareError(CaseError):
  """The run as a whole cannot proceed (bad folder, nothing usable, existing store)."""


@dataclasses.dataclass
class PrepareSummary:
  """What `prepare_dataset` did.

  Attributes:
    data_dir: the store written.
    written: case ids written, sorted.
    labelled: the subset of `written` that has labels.
    skipped: (path, reason) of every case that was skipped.
    seconds: wall time of the whole run.
  """
  data_dir: str
  written: list[str]
  labelled: list[str]
  skipped: list[tuple[str, str]]
  seconds: float

  def __str__(self) -> str:
    lines = [f'prepared {len(self.written)} cases ({len(self.labelled)} labelled) into '
             f'{self.data_dir} in {self.seconds:.1f} s '
             f'({self.seconds / max(len(self.written), 1):.2f} s/case)']
    if self.skipped:
      lines.append(f'skipped {len(self.skipped)} cases:')
      lines += [f'  {path}: {reason}' for path, reason in self.skipped]
    return '\n'.join(lines)


# Standard BTCV (Synapse multi-organ) classes; used when a BTCV folder has no dataset.json.
BTCV_LABEL_NAMES = {
    0: 'background', 1: 'spleen', 2: 'right_kidney', 3: 'left_kidney', 4: 'gallbladder',
    5: 'esophagus', 6: 'liver', 7: 'stomach', 8: 'aorta', 9: 'inferior_vena_cava',
    10: 'portal_and_splenic_vein', 11: 'pancreas', 12: 'right_adrenal_gland',
    13: 'left_adrenal_gland'}


@dataclasses.dataclass(frozen=True)
class RawCase:
  case_id: str
  image: str
  label: str | None


@dataclasses.dataclass
class RawDataset:
  """The cases found in a raw folder.

  Attributes:
    root: absolute raw folder.
    layout: 'msd', 'btcv' or 'folders'.
    cases: cases to preprocess, sorted by id.
    label_names: {value: name} from dataset.json (or BTCV's standard names), else None.
    errors: cases already known to be bad (missing listed files, non-NIfTI names, ...).
  """
  root: str
  layout: str
  cases: list[RawCase]
  label_names: dict[int, str] | None
  errors: list[CaseError]


def _nifti_files(folder: str, errors: list[CaseError]) -> dict[str, str]:
  """{file stem: path} of the NIfTI files in `folder`; other visible files become errors."""
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    # Hidden files include the '._*' resource forks that macOS leaves in MSD archives.
    if name.startswith('.') or os.path.isdir(path):
      continue
    if not nifti_io.is_nifti_name(name):
      errors.append(CaseError(path, 'not a NIfTI file name (expected .nii or .nii.gz)'))
      continue
    out[nifti_io.strip_nifti_suffix(name)] = path
  return out


def _add(cases: dict[str, RawCase], case: RawCase, errors: list[CaseError]) -> None:
  if case.case_id in cases:
    errors.append(CaseError(case.image, f'case id {case.case_id!r} is already used by '
                            f'{cases[case.case_id].image}'))
  else:
    cases[case.case_id] = case


def _pair(images: dict[str, str], labels: dict[str, str], cases: dict[str, RawCase],
          errors: list[CaseError], label_key=lambda key: key, case_id=lambda key: key) -> None:
  used = set()
  for key, image in images.items():
    cid = case_id(key)
    if cid in cases and cases[cid].image == image:
      continue
    label = labels.get(label_key(key))
    used.add(label_key(key))
    _add(cases, RawCase(cid, image, label), errors)
  for key, label in labels.items():
    if key not in used and not any(c.label == label for c in cases.values()):
      errors.append(CaseError(label, 'label has no image with a matching file name'))


def _label_names(labels, path: str) -> dict[int, str]:
  try:
    # MSD maps "value" -> name; nnU-Net v2 maps name -> value.
    return {int(v) if isinstance(v, int) else int(k): str(k if isinstance(v, int) else v)
            for k, v in labels.items()}
  except (AttributeError, TypeError, ValueError) as e:
    raise PrepareError(path, f'"labels" must map class numbers to names ({e})') from e


def _read_dataset_json(path: str) -> dict:
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PrepareError(path, f'not a readable JSON file ({e})') from e
  if not isinstance(meta, dict):
    raise PrepareError(path, 'expected a JSON object')
  return meta


def _msd_case_id_fn(image_stems, label_stems):
  """Case id of an image stem: nnU-Net's channel suffix stripped where the folder uses one.

  nnU-Net's raw format tags every image with a channel (imagesTr/liver_001_0000.nii.gz <->
  labelsTr/liver_001.nii.gz). A plain MSD folder may have a case that merely ends in _0000
  (case_0000, case_0001, ...): there the name is kept, or case_0000 would become 'case'.
  """
  image_stems, label_stems = list(image_stems), set(label_stems)
  tagged = bool(image_stems) and all(
      s.endswith('_0000') and s not in label_stems for s in image_stems)
  return (lambda stem: stem[:-5] if stem.endswith('_0000') else stem) if tagged else (
      lambda stem: stem)


def _discover_msd(root: str, cases: dict, errors: list) -> dict[int, str] | None:
  json_path = os.path.join(root, 'dataset.json')
  meta = _read_dataset_json(json_path) if os.path.exists(json_path) else {}
  label_names = _label_names(meta['labels'], json_path) if 'labels' in meta else None
  listed = [(e, True) for e in meta.get('training', [])]
  listed += [({'image': e} if isinstance(e, str) else e, False) for e in meta.get('test', [])]
  listed_stems = [nifti_io.strip_nifti_suffix(os.path.basename(e['image'])) for e, _ in listed]
  listed_case_id = _msd_case_id_fn(listed_stems, [
      nifti_io.strip_nifti_suffix(os.path.basename(e['label']))
      for e, labelled in listed if labelled and e.get('label')])
  for entry, labelled in listed:
    image = os.path.normpath(os.path.join(root, entry['image']))
    label = entry.get('label') if labelled else None
    label = os.path.normpath(os.path.join(root, label)) if label else None
    missing = [p for p in (image, label) if p and not os.path.exists(p)]
    if missing:
      errors.append(CaseError(missing[0], 'listed in dataset.json but the file is missing'))
      continue
    stem = nifti_io.strip_nifti_suffix(os.path.basename(image))
    _add(cases, RawCase(listed_case_id(stem), image, label), errors)
  for images_sub, labels_sub in (('imagesTr', 'labelsTr'), ('imagesTs', None)):
    images_dir = os.path.join(root, images_sub)
    if not os.path.isdir(images_dir):
      continue
    labels_dir = os.path.join(root, labels_sub) if labels_sub else None
    labels = (_nifti_files(labels_dir, errors)
              if labels_dir and os.path.isdir(labels_dir) else {})
    images = _nifti_files(images_dir, errors)
    case_id = _msd_case_id_fn(images, labels)
    _pair(images, labels, cases, errors, label_key=case_id, case_id=case_id)
  return label_names


def discover(raw_dir, images_dir=None, labels_dir=None) -> RawDataset:
  """Finds the cases of a raw dataset folder (layouts in the module docstring).

  Raises:
    PrepareError: the folder is missing, empty, of no known layout, or has no NIfTI image.
  """
  root = os.path.abspath(os.fspath(raw_dir))
  if not os.path.isdir(root):
    raise PrepareError(root, 'raw folder does not exist (or is not a folder)')
  cases: dict[str, RawCase] = {}
  errors: list[CaseError] = []
  label_names = None
  has = lambda *parts: os.path.isdir(os.path.join(root, *parts))
  if images_dir is not None:
    layout, pairs = 'folders', [(os.path.join(root, images_dir),
                                 os.path.join(root, labels_dir) if labels_dir else None)]
    if labels_dir and not os.path.isdir(pairs[0][1]):
      raise PrepareError(pairs[0][1], 'label folder does not exist')
  elif not os.listdir(root):
    raise PrepareError(root, 'raw folder is empty')
  elif has('imagesTr') or has('imagesTs') or os.path.exists(os.path.join(root, 'dataset.json')):
    layout, pairs = 'msd', []
    label_names = _discover_msd(root, cases, errors)
  elif has('img') or has('Training', 'img'):
    layout, label_names = 'btcv', BTCV_LABEL_NAMES
    base = os.path.join(root, 'Training') if has('Training', 'img') else root
    pairs = [(os.path.join(base, 'img'), os.path.join(base, 'label'))]
    if has('Testing', 'img'):
      pairs.append((os.path.join(root, 'Testing', 'img'), None))
    if os.path.exists(os.path.join(root, 'dataset.json')):
      meta = _read_dataset_json(os.path.join(root, 'dataset.json'))
      if 'labels' in meta:
        label_names = _label_names(meta['labels'], os.path.join(root, 'dataset.json'))
  elif has('images'):
    layout = 'folders'
    pairs = [(os.path.join(root, 'images'), os.path.join(root, 'labels'))]
  else:
    raise PrepareError(root, 'no known layout: expected imagesTr/ (+ labelsTr/, dataset.json) '
                       '(MSD), img/ + label/ (BTCV) or images/ + labels/')
  for image_dir, label_dir in pairs:
    if not os.path.isdir(image_dir):
      raise PrepareError(image_dir, 'image folder does not exist')
    labels = (_nifti_files(label_dir, errors)
              if label_dir and os.path.isdir(label_dir) else {})
    if layout == 'btcv':  # img0001 <-> label0001
      _pair(_nifti_files(image_dir, errors), labels, cases, errors,
            label_key=lambda k: 'label' + k[3:] if k.startswith('img') else k)
    else:
      _pair(_nifti_files(image_dir, errors), labels, cases, errors)
  if not cases:
    where = pairs[0][0] if pairs else os.path.join(root, 'imagesTr')
    if not errors:
      raise PrepareError(where, 'contains no NIfTI images (.nii or .nii.gz)')
  return RawDataset(root=root, layout=layout, cases=sorted(cases.values(),
                                                            key=lambda c: c.case_id),
                    label_names=label_names, errors=errors)


def _json_names(label_names: Mapping[int, str]) -> dict[str, str]:
  return {str(k): v for k, v in sorted(label_names.items())}


def prepare_dataset(raw_dir, data_dir, spacing: Sequence[float] = (1.5, 1.5, 2.0),
                    hu_window: Sequence[float] = (-175.0, 250.0), strict: bool = False,
                    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                    images_dir=None, labels_dir=None, overwrite: bool = False,
                    verbose: bool = True) -> PrepareSummary:
  """Preprocesses a raw NIfTI dataset into a store (see module docstring).

  Args:
    raw_dir: raw dataset folder (MSD, BTCV or images/+labels/ layout).
    data_dir: store folder to create (local path).
    spacing: target voxel size in mm, (x, y, z) in RAS.
    hu_window: (lo, hi) HU window; stored voxels are clipped to it.
    strict: stop at the first bad case instead of skipping it.
    seed: seed of the splits.
    val_fraction: fraction of labelled cases for validation.
    test_fraction: fraction of labelled cases for test.
    images_dir: explicit image folder (with `labels_dir`), overrides auto-detection.
    labels_dir: explicit label folder, or None.
    overwrite: replace an existing `data_dir`.
    verbose: print one progress line per case.

  Returns:
    A `PrepareSummary`.

  Raises:
    PrepareError: bad raw folder, existing store without `overwrite`, or no usable case.
    CaseError: the first bad case, with `strict=True`.
  """
  start = time.time()
  spacing = tuple(float(s) for s in spacing)
  hu_window = tuple(float(h) for h in hu_window)
  if len(spacing) != 3 or min(spacing) <= 0:
    raise PrepareError('--spacing', f'needs 3 positive values, got {spacing}')
  if len(hu_window) != 2 or not -32768 <= hu_window[0] < hu_window[1] <= 32767:
    raise PrepareError('--hu_window', f'needs lo < hi within int16, got {hu_window}')
  try:
    splits_lib.check_fractions(val_fraction, test_fraction)
  except ValueError as e:
    raise PrepareError('--val_fraction/--test_fraction', str(e)) from e
  if '://' in str(data_dir):
    raise PrepareError(data_dir, 'prepare writes local stores only; copy the finished store '
                       'to GCS afterwards (gcloud storage cp -r)')
  data_dir = epath.Path(os.path.abspath(os.fspath(data_dir)))
  if data_dir.exists() and not overwrite:
    raise PrepareError(data_dir, 'store already exists; pass --overwrite to replace it')

  raw = discover(raw_dir, images_dir=images_dir, labels_dir=labels_dir)
  skipped = [(e.path, e.reason) for e in raw.errors]
  if strict and raw.errors:
    raise raw.errors[0]

  data_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = data_dir.parent / f'.{data_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  staging = tmp_dir / 'staging'
  staging.mkdir(parents=True)
  try:
    cases_meta = {}
    found_labels = set()
    for k, case in enumerate(raw.cases):
      t0 = time.time()
      try:
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
        found_labels.update(int(v) for v in np.unique(pre.label) if v)
      cases_meta[case.case_id] = {
          'shape': list(pre.image.shape), 'spacing': list(pre.spacing),
          'affine': pre.affine.tolist(), 'original_affine': pre.original_affine.tolist(),
          'original_shape': list(pre.original_shape),
          'original_spacing': list(pre.original_spacing), 'has_label': pre.label is not None,
          'image_file': os.path.relpath(case.image, raw.root),
          'label_file': os.path.relpath(case.label, raw.root) if case.label else None,
      }
      if verbose:
        print(f'[{k + 1}/{len(raw.cases)}] {case.case_id}: {tuple(pre.original_shape)} -> '
              f'{pre.image.shape}{" +label" if pre.label is not None else ""} '
              f'({time.time() - t0:.1f} s)', flush=True)
    if not cases_meta:
      raise PrepareError(raw.root, 'no usable case remains; skipped: '
                         + '; '.join(f'{p}: {r}' for p, r in skipped))

    if verbose:
      print(f'writing the TFDS ArrayRecord store ({len(cases_meta)} cases)...', flush=True)
    builder_dir = ct_dataset.build(staging, tmp_dir / TFDS_SUBDIR)
    shutil.rmtree(staging)
    labelled = sorted(c for c, m in cases_meta.items() if m['has_label'])
    label_names = raw.label_names
    if label_names is None:
      # No dataset.json: name the classes found in the data.
      label_names = {0: 'background', **{v: f'class_{v}' for v in sorted(found_labels)}}
    split_map = splits_lib.make_splits(cases_meta, labelled, seed=seed,
                                       val_fraction=val_fraction, test_fraction=test_fraction)
    splits_lib.write_splits(tmp_dir / 'splits.json', split_map, seed=seed,
                            val_fraction=val_fraction, test_fraction=test_fraction)
    store = {
        'format_version': STORE_FORMAT_VERSION,
        'spacing': list(spacing),
        'hu_window': list(hu_window),
        'label_names': _json_names(label_names),
        'layout': raw.layout,
        'raw_dir': str(raw.root),
        # Where the raw files are seen from the store, for stores moved together with them
        # (the phantom cache builds in a temporary folder, then renames it).
        'raw_dir_relative': os.path.relpath(str(raw.root), os.path.abspath(os.fspath(data_dir))),
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'tfds': {'builder_dir': str(builder_dir.relative_to(tmp_dir)),
                 'split': ct_dataset.ALL_SPLIT},
        'cases': dict(sorted(cases_meta.items())),
        'skipped': [{'path': p, 'reason': r} for p, r in skipped],
    }
    (tmp_dir / 'store.json').write_text(json.dumps(store, indent=1))
    _replace_dir(tmp_dir, data_dir, overwrite)
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
  return PrepareSummary(data_dir=str(data_dir), written=sorted(cases_meta), labelled=labelled,
                        skipped=skipped, seconds=time.time() - start)


def _replace_dir(tmp_dir: epath.Path, data_dir: epath.Path, overwrite: bool) -> None:
  """Moves the finished store into place; rename is atomic on one filesystem."""
  old = None
  if data_dir.exists():
    if not overwrite:
      raise PrepareError(data_dir, 'store appeared while preparing; pass --overwrite')
    old = data_dir.parent / f'.{data_dir.name}.old-{uuid.uuid4().hex[:8]}'
    os.rename(data_dir, old)
  os.rename(tmp_dir, data_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _floats(text: str, n: int, flag: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != n:
    raise argparse.ArgumentTypeError(f'{flag} needs {n} comma-separated numbers, got {text!r}')
  return values


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m pixssl_jax.data.prepare',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--raw_dir', required=True, help='raw dataset folder')
  parser.add_argument('--data_dir', required=True, help='store folder to create')
  parser.add_argument('--spacing', default='1.5,1.5,2.0',
                      type=lambda s: _floats(s, 3, '--spacing'), help='target mm x,y,z')
  parser.add_argument('--hu_window', default='-175,250',
                      type=lambda s: _floats(s, 2, '--hu_window'), help='HU lo,hi')
  parser.add_argument('--strict', action='store_true', help='stop at the first bad case')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing store')
  parser.add_argument('--seed', type=int, default=0, help='seed of the splits')
  parser.add_argument('--val_fraction', type=float, default=0.2)
  parser.add_argument('--test_fraction', type=float, default=0.2)
  parser.add_argument('--images_dir', default=None, help='explicit image folder')
  parser.add_argument('--labels_dir', default=None, help='explicit label folder')
  parser.add_argument('--quiet', action='store_true', help='no per-case progress lines')
  args = parser.parse_args(argv)
  try:
    summary = prepare_dataset(
        args.raw_dir, args.data_dir, spacing=args.spacing, hu_window=args.hu_window,
        strict=args.strict, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, images_dir=args.images_dir,
        labels_dir=args.labels_dir, overwrite=args.overwrite, verbose=not args.quiet)
  except CaseError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
