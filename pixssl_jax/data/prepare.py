"""Raw NIfTI folder -> preprocessed TFDS ArrayRecord store (`STORE/`), CLI and Python API.

    python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE \
        [--spacing 1.5,1.5,2.0] [--hu_window -175,250] [--seed 0] [--strict] [--overwrite] \
        [--transductive]

Raw layouts read (auto-detected, or `--images_dir`/`--labels_dir`):
- MSD: `imagesTr/` + optional `labelsTr/` + `dataset.json`; `imagesTs/` images are unlabelled.
- BTCV: `img/imgNNNN.nii.gz` + `label/labelNNNN.nii.gz` (or `Training/` + `Testing/` above).
- Any `images/` + `labels/` folders whose files have matching names.
Images without a label are kept for pre-training only.

Output (`STORE/`): `tfds/ct_volumes/1.0.0/` (the ArrayRecord store, see `ct_dataset.py`),
`store.json` (spacing, HU window, label names, per-case geometry) and `splits.json`. The
store is built in a temporary folder beside `STORE` and renamed at the end, so a failed run
leaves no store; temporary folders of killed runs are removed by the next run. `--overwrite`
replaces only a store that `prepare` wrote. Bad cases are skipped with a reason (or stop the
run with `--strict`).
"""
import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
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


def _nifti_files(folder: str, errors: list[CaseError]) -> dict[str, str | None]:
  """{file stem: path} of the NIfTI files in `folder`; other visible files become errors.

  A stem given by two files (`a.nii` and `a.nii.gz`) maps to None, with an error naming both:
  nothing says which one is the case, so the case is skipped.
  """
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    # Hidden files include the '._*' resource forks that macOS leaves in MSD archives.
    if name.startswith('.') or os.path.isdir(path):
      continue
    if not nifti_io.is_nifti_name(name):
      errors.append(CaseError(path, 'not a NIfTI file name (expected .nii or .nii.gz)'))
      continue
    stem = nifti_io.strip_nifti_suffix(name)
    if stem in out:
      if out[stem] is not None:
        errors.append(CaseError(out[stem], f'case id {stem!r} is also given by {path}; '
                                'remove or rename one of the two files'))
      out[stem] = None
      continue
    out[stem] = path
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
    used.add(label_key(key))
    if image is None or (label_key(key) in labels and labels[label_key(key)] is None):
      # Two files give this image or label (error already recorded): skip the whole case,
      # also where dataset.json listed one of the two.
      cases.pop(cid, None)
      continue
    if cid in cases and cases[cid].image == image:
      continue
    _add(cases, RawCase(cid, image, labels.get(label_key(key))), errors)
  for key, label in labels.items():
    if (label is not None and key not in used
        and not any(c.label == label for c in cases.values())):
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

  Args:
    raw_dir: raw dataset folder.
    images_dir: explicit image folder, overriding auto-detection; None to auto-detect.
    labels_dir: explicit label folder (with `images_dir`), or None.
    Relative paths are relative to the current directory; `~` is expanded.

  Raises:
    PrepareError: the folder is missing, empty, of no known layout, or has no NIfTI image.
  """
  root, images_dir, labels_dir = (local_path(p) for p in (raw_dir, images_dir, labels_dir))
  if not os.path.isdir(root):
    raise PrepareError(root, 'raw folder does not exist (or is not a folder)')
  cases: dict[str, RawCase] = {}
  errors: list[CaseError] = []
  label_names = None
  has = lambda *parts: os.path.isdir(os.path.join(root, *parts))
  if images_dir is not None:
    layout, pairs = 'folders', [(images_dir, labels_dir)]
    if labels_dir and not os.path.isdir(labels_dir):
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


def local_path(path) -> str | None:
  """A path as `prepare` uses it: local ones absolute with `~` expanded; URLs and None kept."""
  if path is None:
    return None
  path = os.fspath(path)
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def prepare_dataset(raw_dir, data_dir, spacing: Sequence[float] = (1.5, 1.5, 2.0),
                    hu_window: Sequence[float] = (-175.0, 250.0), strict: bool = False,
                    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                    images_dir=None, labels_dir=None, overwrite: bool = False,
                    verbose: bool = True, transductive: bool = False) -> PrepareSummary:
  """Preprocesses a raw NIfTI dataset into a store (see module docstring).

  Args:
    raw_dir: raw dataset folder (MSD, BTCV or images/+labels/ layout).
    data_dir: store folder to create (local path). It must not exist, be empty, or hold a
      store written by `prepare` (replaced only with `overwrite`), and must not overlap the
      raw folders.
    spacing: target voxel size in mm, (x, y, z) in RAS.
    hu_window: (lo, hi) HU window; stored voxels are clipped to it.
    strict: stop at the first bad case instead of skipping it.
    seed: seed of the splits.
    val_fraction: fraction of labelled cases for validation.
    test_fraction: fraction of labelled cases for test.
    images_dir: explicit image folder (with `labels_dir`), overrides auto-detection.
    labels_dir: explicit label folder, or None.
    overwrite: replace an existing store in `data_dir`.
    verbose: print one progress line per case.
    transductive: the `pretrain` split holds every case, `val` and `test` included; by
      default it leaves them out.
    Relative paths are relative to the current directory; `~` is expanded.

  Returns:
    A `PrepareSummary`.

  Raises:
    PrepareError: bad raw folder or `data_dir`, existing store without `overwrite`, or no
      usable case.
    CaseError: the first bad case, with `strict=True`.
  """
  start = time.time()
  raw_dir, data_dir, images_dir, labels_dir = (
      local_path(p) for p in (raw_dir, data_dir, images_dir, labels_dir))
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
  if '://' in data_dir:
    raise PrepareError(data_dir, 'prepare writes local stores only; copy the finished store '
                       'to GCS afterwards (gcloud storage cp -r)')
  sources = {'--raw_dir': raw_dir, '--images_dir': images_dir, '--labels_dir': labels_dir}
  for flag, path in sources.items():
    if path is not None and '://' in path:
      raise PrepareError(path, f'{flag}: prepare reads local folders only; copy the raw data '
                         'to local disk first (gcloud storage cp -r)')
  _check_apart(data_dir, sources)
  _check_target(data_dir, overwrite)

  raw = discover(raw_dir, images_dir=images_dir, labels_dir=labels_dir)
  skipped = [(e.path, e.reason) for e in raw.errors]
  if strict and raw.errors:
    raise raw.errors[0]

  os.makedirs(os.path.dirname(data_dir), exist_ok=True)
  for path in _remove_stale_temps(data_dir):
    if verbose:
      print(f'removed {path}, left behind by an interrupted prepare run', flush=True)
  tmp_dir = epath.Path(_temp_path(data_dir, 'tmp'))
  staging = tmp_dir / 'staging'
  staging.mkdir(parents=True)
  try:
    cases_meta = {}
    label_files = {}  # Each label value > 0 -> the first label file holding it.
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
        for value in np.unique(pre.label):
          if value:
            label_files.setdefault(int(value), case.label)
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
    if raw.label_names is None:
      _check_consecutive_labels(label_files)

    if verbose:
      print(f'writing the TFDS ArrayRecord store ({len(cases_meta)} cases)...', flush=True)
    builder_dir = ct_dataset.build(staging, tmp_dir / TFDS_SUBDIR)
    shutil.rmtree(staging)
    labelled = sorted(c for c, m in cases_meta.items() if m['has_label'])
    label_names = raw.label_names
    if label_names is None:
      # No dataset.json: name the classes found in the data.
      label_names = {0: 'background', **{v: f'class_{v}' for v in sorted(label_files)}}
    split_map = splits_lib.make_splits(cases_meta, labelled, seed=seed,
                                       val_fraction=val_fraction, test_fraction=test_fraction,
                                       transductive=transductive)
    splits_lib.write_splits(tmp_dir / 'splits.json', split_map, seed=seed,
                            val_fraction=val_fraction, test_fraction=test_fraction,
                            pretrain_excludes_eval=not transductive)
    store = {
        'format_version': STORE_FORMAT_VERSION,
        'spacing': list(spacing),
        'hu_window': list(hu_window),
        'label_names': _json_names(label_names),
        'layout': raw.layout,
        'raw_dir': str(raw.root),
        # Where the raw files are seen from the store, for stores moved together with them
        # (the phantom cache builds in a temporary folder, then renames it).
        'raw_dir_relative': os.path.relpath(str(raw.root), data_dir),
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'tfds': {'builder_dir': str(builder_dir.relative_to(tmp_dir)),
                 'split': ct_dataset.ALL_SPLIT},
        'cases': dict(sorted(cases_meta.items())),
        'skipped': [{'path': p, 'reason': r} for p, r in skipped],
    }
    (tmp_dir / 'store.json').write_text(json.dumps(store, indent=1))
    _move_into_place(str(tmp_dir), data_dir, overwrite)
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
  return PrepareSummary(data_dir=data_dir, written=sorted(cases_meta), labelled=labelled,
                        skipped=skipped, seconds=time.time() - start)


def _check_consecutive_labels(label_files: Mapping[int, str]) -> None:
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


# --- The store folder: where a store may go, its temporary folders, the final rename. ---

# Temporary folders beside STORE: `.STORE.tmp-<host>-<pid>-<rand>` (the store being built)
# and `.STORE.old-<host>-<pid>-<rand>` (the store being replaced). The host tag and pid tell a
# later run whether the owner is gone; folders without a host tag come from older versions.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_path(data_dir: str, kind: str) -> str:
  parent, name = os.path.split(data_dir)
  suffix = f'{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  return os.path.join(parent, f'.{name}.{kind}-{suffix}')


def _process_alive(pid: int) -> bool:
  if os.name != 'posix':
    return True  # os.kill(pid, 0) would terminate the process on Windows; never judge there.
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: alive, owned by another user.
    return True
  return True


def _remove_stale_temps(data_dir: str) -> list[str]:
  """Removes temporary folders of earlier runs for `data_dir` whose process is gone.

  Only names of `_temp_path`'s pattern, made on this host, are touched; a folder of a run
  still in progress (its pid alive) is left alone.

  Returns:
    The folders removed.
  """
  parent, name = os.path.split(data_dir)
  pattern = re.compile(
      rf'\.{re.escape(name)}\.(?:tmp|old)-(?:([0-9a-f]{{8}})-)?(\d+)-[0-9a-f]{{8}}')
  removed = []
  for entry in sorted(os.listdir(parent)):
    match = pattern.fullmatch(entry)
    path = os.path.join(parent, entry)
    if (not match or match.group(1) not in (None, _HOST_TAG)
        or _process_alive(int(match.group(2)))
        or os.path.islink(path) or not os.path.isdir(path)):
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def _not_a_store(path: str) -> str | None:
  """Why `path` does not hold a store written by `prepare`; None when it does (a store.json
  with a format version)."""
  store_json = os.path.join(path, 'store.json')
  if not os.path.exists(store_json):
    return 'no store.json'
  try:
    with open(store_json) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError.
    return f'its store.json does not read: {type(e).__name__}'
  if not isinstance(meta, dict) or 'format_version' not in meta:
    return 'its store.json has no format_version'
  return None


def _is_store(path: str) -> bool:
  return _not_a_store(path) is None


def _check_target(data_dir: str, overwrite: bool) -> None:
  """Raises PrepareError unless `data_dir` is absent, empty, or a store to overwrite."""
  if not os.path.lexists(data_dir):
    return
  if not os.path.isdir(data_dir):
    raise PrepareError(data_dir, '--data_dir exists and is not a folder')
  not_a_store = _not_a_store(data_dir)
  if not_a_store is None:
    if not overwrite:
      raise PrepareError(data_dir, 'store already exists; pass --overwrite to replace it')
  elif os.listdir(data_dir):
    raise PrepareError(data_dir, '--data_dir is not empty and is not a store written by '
                       f'prepare ({not_a_store}); ' + (
                           '--overwrite replaces only stores, nothing was touched' if overwrite
                           else 'choose a new or empty folder'))


def _inside(path: str, folder: str) -> bool:
  return path != folder and os.path.commonpath([path, folder]) == folder


def _check_apart(data_dir: str, sources: Mapping[str, str | None]) -> None:
  """Raises PrepareError if `data_dir` is, contains or lies inside a source folder.

  A store inside the raw folder would be read back as raw data, and replacing a store that
  contains the raw folder would delete it; real paths, so symlinks cannot hide either.
  """
  store_real = os.path.realpath(data_dir)
  for flag, source in sources.items():
    if source is None:
      continue
    source_real = os.path.realpath(source)
    if store_real == source_real:
      relation = 'is the same folder as'
    elif _inside(store_real, source_real):
      relation = 'is inside'
    elif _inside(source_real, store_real):
      relation = 'contains'
    else:
      continue
    raise PrepareError(data_dir, f'--data_dir {relation} {flag} {source}; write the store to '
                       'a folder of its own')


@contextlib.contextmanager
def _signals_deferred():
  """Holds SIGINT and SIGTERM back (delivered on exit) so a rename pair is never cut."""
  can_block = (hasattr(signal, 'pthread_sigmask')
               and threading.current_thread() is threading.main_thread())
  held = {signal.SIGINT, signal.SIGTERM}
  old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if can_block else None
  try:
    yield
  finally:
    if can_block:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _move_into_place(tmp_dir: str, data_dir: str, overwrite: bool) -> None:
  """Moves the finished store to `data_dir`; each rename is atomic on one filesystem."""
  _check_target(data_dir, overwrite)  # Again: something may have appeared meanwhile.
  old = None
  with _signals_deferred():
    if _is_store(data_dir):
      old = _temp_path(data_dir, 'old')
      os.rename(data_dir, old)
    try:
      # Onto an absent or empty folder; a folder filled meanwhile makes this fail, not vanish.
      os.rename(tmp_dir, data_dir)
    except OSError as e:
      if old is not None:
        os.rename(old, data_dir)
      raise PrepareError(data_dir, f'cannot move the finished store into place ({e.strerror}); '
                         'nothing was changed') from e
  if old is not None and os.path.islink(old):
    os.remove(old)  # A link to a store: drop the link, leave what it pointed to.
  elif old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _floats(text: str, n: int, flag: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != n:
    raise argparse.ArgumentTypeError(f'{flag} needs {n} comma-separated numbers, got {text!r}')
  return values


# A value that starts like a negative number: '-175,250', '-1.5', '-.5,2', '-1e3'.
_NEGATIVE_VALUE = re.compile(r'-\.?\d')


def join_negative_values(argv: Sequence[str], value_options: Sequence[str],
                         all_options: Sequence[str]) -> list[str]:
  """Rewrites `--opt -175,250` as `--opt=-175,250` for options that take a value.

  argparse reads any token that starts with '-' as an option unless it is one plain negative
  number, so a negative comma list after its option would be a missing value followed by an
  unknown option. An option may be abbreviated, as argparse allows.

  Args:
    argv: command-line tokens (without the program name).
    value_options: option strings that take one value.
    all_options: every option string of the parser (to resolve abbreviations).

  Returns:
    The tokens, with each such option and its value joined by '='.
  """
  out, i = [], 0
  while i < len(argv):
    token = argv[i]
    if token == '--':
      return out + list(argv[i:])
    if (token.startswith('--') and '=' not in token and i + 1 < len(argv)
        and _NEGATIVE_VALUE.match(argv[i + 1])):
      matches = [token] if token in all_options else [
          o for o in all_options if o.startswith(token)]
      if len(matches) == 1 and matches[0] in value_options:
        out.append(f'{token}={argv[i + 1]}')
        i += 2
        continue
    out.append(token)
    i += 1
  return out


class Terminated(BaseException):
  """SIGTERM arrived; a BaseException so that no `except Exception` swallows it."""


def _raise_terminated(signum, frame):
  del frame
  raise Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status.

  0: the store was written; 2: refused (a bad argument, raw folder or target, no usable case,
  a bad case with --strict), nothing written; 1: a fault while writing (no space, I/O);
  143: stopped by SIGTERM. Argument errors that argparse finds exit 2 too.
  """
  parser = argparse.ArgumentParser(prog='python -m pixssl_jax.data.prepare',
                                   description=__doc__.split('\n')[0])
  add = parser.add_argument
  actions = [
      add('--raw_dir', required=True, help='raw dataset folder'),
      add('--data_dir', required=True,
          help='store folder to create (new, empty, or a store to replace with --overwrite)'),
      add('--spacing', default='1.5,1.5,2.0', type=lambda s: _floats(s, 3, '--spacing'),
          help='target mm x,y,z'),
      add('--hu_window', default='-175,250', type=lambda s: _floats(s, 2, '--hu_window'),
          help='HU lo,hi'),
      add('--strict', action='store_true', help='stop at the first bad case'),
      add('--overwrite', action='store_true', help='replace an existing store'),
      add('--transductive', action='store_true',
          help='pretrain split holds every case, val and test included'),
      add('--seed', type=int, default=0, help='seed of the splits'),
      add('--val_fraction', type=float, default=0.2),
      add('--test_fraction', type=float, default=0.2),
      add('--images_dir', default=None, help='explicit image folder'),
      add('--labels_dir', default=None, help='explicit label folder'),
      add('--quiet', action='store_true', help='no per-case progress lines'),
  ]
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(join_negative_values(
      argv, value_options=[o for a in actions if a.nargs != 0 for o in a.option_strings],
      all_options=[o for a in actions for o in a.option_strings]))
  # SIGTERM (kill, a scheduler's stop) becomes an exception so that the temporary store is
  # removed on the way out; signal handlers can only be set in the main thread.
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
  try:
    summary = prepare_dataset(
        args.raw_dir, args.data_dir, spacing=args.spacing, hu_window=args.hu_window,
        strict=args.strict, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, images_dir=args.images_dir,
        labels_dir=args.labels_dir, overwrite=args.overwrite, verbose=not args.quiet,
        transductive=args.transductive)
  except CaseError as e:  # Refused: the temporary store is gone, nothing was written.
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # A fault while writing (a full disk): the temporary store is gone.
    print(f'error: writing the store {args.data_dir} failed: {e}', file=sys.stderr)
    return 1
  except Terminated:
    print('error: stopped by SIGTERM; temporary files removed', file=sys.stderr)
    return 128 + signal.SIGTERM
  finally:
    if in_main_thread:  # None: a handler set outside Python; SIG_DFL is the closest.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
  print(summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
