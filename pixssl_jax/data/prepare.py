"""Raw NIfTI folder -> preprocessed TFDS ArrayRecord store (`STORE/`), CLI and Python API.

    python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE \
        [--spacing 1.5,1.5,2.0] [--hu_window -175,250] [--seed 0] [--strict] [--overwrite] \
        [--transductive]

Raw layouts read (auto-detected, or `--images_dir`/`--labels_dir`; one module each under
`pixssl_jax/data/layouts/`):
- MSD: `imagesTr/` + optional `labelsTr/` + `dataset.json`; `imagesTs/` images are unlabelled.
- BTCV: `img/imgNNNN.nii.gz` + `label/labelNNNN.nii.gz` (or `Training/` + `Testing/` above).
- Any `images/` + `labels/` folders whose files have matching names.
- Images only: NIfTI files directly in RAW.
Images without a label are kept for pre-training only.

Output (`STORE/`): `tfds/ct_volumes/1.0.0/` (the ArrayRecord store, see `ct_dataset.py`),
`store.json` (spacing, HU window, label names, per-case geometry) and `splits.json`. The
store is built in a temporary folder beside `STORE` and renamed at the end, so a failed run
leaves no store; temporary folders of killed runs are removed by the next run
(`store_folder.py`). `--overwrite` replaces only a store that `prepare` wrote. Bad cases are
skipped with a reason (or stop the run with `--strict`; `case_processing.py`).
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from collections.abc import Sequence

from pixssl_jax.data import case_processing
from pixssl_jax.data import ct_dataset
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.data import store_folder
from pixssl_jax.data.layouts import discover
from pixssl_jax.data.raw_cases import CaseError
from pixssl_jax.data.raw_cases import local_path
from pixssl_jax.data.raw_cases import PrepareError
from pixssl_jax.data.raw_cases import RawDataset

# Callers catch `prepare.CaseError` for any bad case or folder, `prepare.PrepareError` for a
# refused run, and find the raw cases with `prepare.discover`.
__all__ = ['CaseError', 'PrepareError', 'PrepareSummary', 'discover', 'join_negative_values',
           'local_path', 'main', 'prepare_dataset']

STORE_FORMAT_VERSION = 1
TFDS_SUBDIR = 'tfds'


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


def _json_names(label_names: Mapping[int, str]) -> dict[str, str]:
  return {str(k): v for k, v in sorted(label_names.items())}


def _checked_settings(spacing, hu_window, val_fraction, test_fraction):
  """Spacing and HU window as float tuples; PrepareError naming the flag of a bad value."""
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
  return spacing, hu_window


def _check_folders(data_dir: str, sources: Mapping[str, str | None], overwrite: bool) -> None:
  """Refuses remote folders, a store that overlaps the raw data, and a target in use."""
  if '://' in data_dir:
    raise PrepareError(data_dir, 'prepare writes local stores only; copy the finished store '
                       'to GCS afterwards (gcloud storage cp -r)')
  for flag, path in sources.items():
    if path is not None and '://' in path:
      raise PrepareError(path, f'{flag}: prepare reads local folders only; copy the raw data '
                         'to local disk first (gcloud storage cp -r)')
  store_folder.check_apart(data_dir, sources)
  store_folder.check_target(data_dir, overwrite)


def _write_store(tmp_dir, data_dir: str, raw: RawDataset, cases_meta: dict,
                 label_files: dict, skipped: list, spacing, hu_window, split_args: dict,
                 verbose: bool) -> list[str]:
  """Writes the TFDS store, `splits.json` and `store.json` into `tmp_dir`.

  Returns:
    The labelled case ids, sorted.
  """
  if verbose:
    print(f'writing the TFDS ArrayRecord store ({len(cases_meta)} cases)...', flush=True)
  builder_dir = ct_dataset.build(tmp_dir / 'staging', tmp_dir / TFDS_SUBDIR)
  shutil.rmtree(tmp_dir / 'staging')
  labelled = sorted(c for c, m in cases_meta.items() if m['has_label'])
  split_map = splits_lib.make_splits(cases_meta, labelled, **split_args)
  transductive = split_args['transductive']
  splits_lib.write_splits(tmp_dir / 'splits.json', split_map, seed=split_args['seed'],
                          val_fraction=split_args['val_fraction'],
                          test_fraction=split_args['test_fraction'],
                          pretrain_excludes_eval=not transductive)
  store = {
      'format_version': STORE_FORMAT_VERSION,
      'spacing': list(spacing),
      'hu_window': list(hu_window),
      'label_names': _json_names(case_processing.class_names(raw.label_names, label_files)),
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
  return labelled


def prepare_dataset(raw_dir, data_dir, spacing: Sequence[float] = (1.5, 1.5, 2.0),
                    hu_window: Sequence[float] = (-175.0, 250.0), strict: bool = False,
                    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                    images_dir=None, labels_dir=None, overwrite: bool = False,
                    verbose: bool = True, transductive: bool = False) -> PrepareSummary:
  """Preprocesses a raw NIfTI dataset into a store (see module docstring).

  Args:
    raw_dir: raw dataset folder (any layout of `pixssl_jax.data.layouts`).
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
  # 1. Refuse bad settings and folders before reading anything.
  spacing, hu_window = _checked_settings(spacing, hu_window, val_fraction, test_fraction)
  _check_folders(data_dir, {'--raw_dir': raw_dir, '--images_dir': images_dir,
                            '--labels_dir': labels_dir}, overwrite)
  # 2. Find the cases.
  raw = discover(raw_dir, images_dir=images_dir, labels_dir=labels_dir)
  skipped = [(e.path, e.reason) for e in raw.errors]
  if strict and raw.errors:
    raise raw.errors[0]
  # 3. Preprocess them into a temporary store, 4. write it and move it into place.
  with store_folder.temporary_store(data_dir, verbose) as tmp_dir:
    cases_meta, label_files = case_processing.process_cases(
        raw, tmp_dir / 'staging', spacing, hu_window, strict, skipped, verbose)
    if raw.label_names is None:
      case_processing.check_consecutive_labels(label_files)
    split_args = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                      transductive=transductive)
    labelled = _write_store(tmp_dir, data_dir, raw, cases_meta, label_files, skipped, spacing,
                            hu_window, split_args, verbose)
    store_folder.move_into_place(str(tmp_dir), data_dir, overwrite)
  return PrepareSummary(data_dir=data_dir, written=sorted(cases_meta), labelled=labelled,
                        skipped=skipped, seconds=time.time() - start)


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
