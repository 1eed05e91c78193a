r"""Segments new CT scans with a fine-tuned run (console script `pixssl-predict`).

  python -m pixssl_jax.predict --workdir RUN -i INPUT -o OUTPUT_DIR \
      [--checkpoint best|last|STEP] [--uncertainty] [--probabilities] \
      [--batch_size N] [--overlap F] [--mc_samples K]

INPUT is a NIfTI file (`.nii`, `.nii.gz`) or a folder of them, never prepared: any
orientation, spacing, integer or float type and scl_slope/scl_inter. Each scan is preprocessed
as the run's store was (reoriented to RAS, resampled to the store spacing, clipped to its HU
window: `WORKDIR/run.json`), segmented by sliding windows with the run's checkpoint, and the
labels are resampled (nearest) back onto the scan's own grid and written under the scan's file
name in OUTPUT_DIR, with its header geometry (qform, sform and their codes) copied as stored,
so the file reads back with the input's affine and opens over it in any viewer.

Also written: `labels.json` (class number -> name); with `--uncertainty`,
`NAME_uncertainty.nii.gz` (the MC-dropout variance of the probabilities, summed over classes,
in [0, 1]; the labels are then the argmax of the MC mean); with `--probabilities`,
`NAME_probabilities.npz` (`probabilities` float16 `[X, Y, Z, K]` on the scan's grid, linearly
resampled, and its `affine`: NIfTI has no float16 type). Every file is written under a
temporary name and renamed. A scan that cannot be used (unreadable, not 3-D, no affine, NaN
voxels, not HU) is skipped with one line on stderr naming it and why; the others are still
written. Exit status: 0 all written, 1 some scans skipped, 2 the run or the options are
unusable (nothing written).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import nibabel as nib
import numpy as np

from pixssl_jax import paths
from pixssl_jax.data import intensity
from pixssl_jax.data import nifti_io
from pixssl_jax.evaluation import export
from pixssl_jax.evaluation import inference
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks
from pixssl_jax.rundir import orbax_noise
from pixssl_jax.rundir import run_record

LABELS_FILE = 'labels.json'
EXIT_OK, EXIT_SKIPPED, EXIT_REFUSED = 0, 1, 2


def find_inputs(source: str) -> list[str]:
  """The NIfTI files of `source` (a file, or a folder's visible `.nii`/`.nii.gz`), sorted."""
  if os.path.isfile(source):
    return [source]
  if not os.path.isdir(source):
    raise config_io.ConfigError(f'-i {source}: no such file or folder')
  files = sorted(os.path.join(source, n) for n in os.listdir(source)
                 if nifti_io.is_nifti_name(n) and not n.startswith('.')
                 and os.path.isfile(os.path.join(source, n)))
  if not files:
    raise config_io.ConfigError(f'-i {source}: no .nii or .nii.gz file in the folder')
  return files


def _check_geometry(path: str) -> nib.Nifti1Image:
  """The scan's nibabel image, refused when its header gives no affine at all."""
  try:
    img = nib.load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise nifti_io.CaseError(path, f'not a readable NIfTI file ({type(e).__name__}: {e})'
                             ) from None
  header = getattr(img, 'header', None)
  if (header is not None and 'qform_code' in header and int(header['qform_code']) == 0
      and int(header['sform_code']) == 0):
    raise nifti_io.CaseError(path, 'no affine (qform_code and sform_code are both 0): '
                             'where the scan lies in the body is unknown')
  return img


class Predictor:
  """A fine-tuned run's network, its preprocessing, and the options of one prediction.

  Args:
    model: the `SegmentationModel`.
    params: its parameters (on one device).
    config: the run's config, with `eval.batch_size`, `eval.overlap`, `eval.mc_samples` as
      this prediction uses them.
    record: `run_record.read(...)`: spacing, HU window, class names.
    uncertainty: also write the MC-dropout uncertainty map.
    probabilities: also write the per-class probabilities.
  """

  def __init__(self, model, params, config: ml_collections.ConfigDict, record: dict, *,
               uncertainty: bool = False, probabilities: bool = False):
    self.model, self.params, self.config, self.record = model, params, config, record
    self.uncertainty, self.probabilities = uncertainty, probabilities
    self.scorer = inference.VolumeScorer(model, config, uncertainty=uncertainty)

  def preprocess(self, path: str) -> tuple[nib.Nifti1Image, nifti_io.PreprocessedCase]:
    """The scan as the run's store holds its cases (`CaseError` for a bad file)."""
    reference = _check_geometry(path)
    case = nifti_io.preprocess_case(path, None, spacing=self.record['spacing'],
                                    hu_window=self.record['hu_window'])
    return reference, case

  def segment(self, case: nifti_io.PreprocessedCase) -> np.ndarray:
    """The network's outputs `[X, Y, Z, K (+1)]` on the store grid for one preprocessed scan."""
    image = intensity.scale_hu(case.image, self.record['hu_window'])[..., None]
    return self.scorer.outputs(self.params, image)

  def write(self, path: str, reference, case: nifti_io.PreprocessedCase, out: np.ndarray,
            out_dir: str) -> list[str]:
    """Writes the outputs of one scan on its own grid; returns the files written."""
    meta = {'affine': case.affine, 'original_affine': case.original_affine,
            'original_shape': case.original_shape, 'shape': case.image.shape}
    name = os.path.basename(path)
    stem = nifti_io.strip_nifti_suffix(name)
    labels, uncertainty = self.scorer.split(out)
    target = os.path.join(out_dir, name)
    written = [export.save_on_reference_grid(
        export.labels_on_original_grid(labels, meta, target), reference, target)]
    to_grid = lambda values: nifti_io.to_original_grid(
        np.ascontiguousarray(values, np.float32), case.affine, case.original_affine,
        case.original_shape, order=1)
    if uncertainty is not None:
      written.append(export.save_on_reference_grid(
          to_grid(uncertainty), reference, os.path.join(out_dir, f'{stem}_uncertainty.nii.gz')))
    if self.probabilities:
      k = self.record['num_classes']
      maps = np.stack([to_grid(out[..., c]) for c in range(k)], axis=-1).astype(np.float16)
      written.append(_save_npz(os.path.join(out_dir, f'{stem}_probabilities.npz'),
                               probabilities=maps, affine=reference.affine))
    return written


def _save_npz(path: str, **arrays) -> str:
  tmp = f'{path}.tmp-{os.getpid()}.npz'
  try:
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load_predictor(workdir: str, *, checkpoint='best', uncertainty: bool = False,
                   probabilities: bool = False, batch_size: int | None = None,
                   overlap: float | None = None, mc_samples: int | None = None,
                   print_fn=print) -> Predictor:
  """The `Predictor` of a fine-tuning run: its config, record, network and checkpoint.

  Options left None take the run's own `eval.*` values.
  """
  config = config_io.read_config(workdir, modes=('finetune', 'evaluate'), what='--workdir')
  overrides = {'eval.batch_size': batch_size, 'eval.overlap': overlap,
               'eval.mc_samples': mc_samples}
  config = config_io.apply_overrides(config, {k: v for k, v in overrides.items()
                                              if v is not None})
  config.eval.uncertainty = bool(uncertainty)
  config.eval.checkpoint = checkpoint
  problems = config_io.eval_problems(config)
  if config.eval.batch_size < 1 or not 0 <= config.eval.overlap < 1:
    problems.append(f'--batch_size {config.eval.batch_size} must be >= 1 and --overlap '
                    f'{config.eval.overlap} in [0, 1).')
  if problems:
    raise config_io.ConfigError('; '.join(p.replace('config.eval.', '--') for p in problems))
  record = run_record.read(workdir, config)
  model = networks.segmentation_model(config, record['num_classes'])
  params, step = networks.restore_segmentation_params(
      workdir, config, model, checkpoint, field='checkpoint',
      none_hint='fine-tune first (python -m pixssl_jax.main --config configs/finetune.py:...)')
  print_fn(f'pixssl_jax predict: checkpoint {step} ({checkpoint}) of {workdir}; '
           f'{jax.devices()[0].platform}; store grid {record["spacing"]} mm, '
           f'HU {record["hu_window"]}, {record["num_classes"]} classes')
  return Predictor(model, params, config, record, uncertainty=uncertainty,
                   probabilities=probabilities)


def _print_now(line: str) -> None:
  print(line, flush=True)


def predict_files(predictor: Predictor, files: Sequence[str], out_dir: str,
                  print_fn=_print_now, error_fn=None) -> list[tuple[str, str]]:
  """Segments `files` into `out_dir`, one progress line each; returns the skipped (path, why)."""
  error_fn = error_fn or (lambda line: print(line, file=sys.stderr, flush=True))
  os.makedirs(out_dir, exist_ok=True)
  labels = {str(k): v for k, v in sorted(predictor.record['label_names'].items())}
  config_io.write_json(os.path.join(out_dir, LABELS_FILE), labels)
  skipped, start = [], time.perf_counter()
  for i, path in enumerate(files):
    began = time.perf_counter()
    try:
      reference, case = predictor.preprocess(path)
    except nifti_io.CaseError as e:
      skipped.append((path, e.reason))
      error_fn(f'skipped {path}: {e.reason}')
      continue
    written = predictor.write(path, reference, case, predictor.segment(case), out_dir)
    took = time.perf_counter() - began
    left = (time.perf_counter() - start) / (i + 1) * (len(files) - i - 1)
    print_fn(f'[{i + 1}/{len(files)}] {os.path.basename(path)}: {case.original_shape} -> '
             f'{written[0]} ({took:.1f} s; ETA {left:.0f} s)')
  return skipped


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='pixssl-predict', description=__doc__.split('\n')[0])
  add = parser.add_argument
  add('--workdir', required=True, help='a fine-tuning run directory')
  add('-i', '--input', required=True, help='a NIfTI file or a folder of them')
  add('-o', '--output', required=True, help='folder for the label files and labels.json')
  add('--checkpoint', default='best', help="'best' (highest validation Dice), 'last' or a step")
  add('--uncertainty', action='store_true', help='also write NAME_uncertainty.nii.gz')
  add('--probabilities', action='store_true', help='also write NAME_probabilities.npz')
  add('--batch_size', type=int, default=None, help="windows per device call (run's eval)")
  add('--overlap', type=float, default=None, help="sliding-window overlap (run's eval)")
  add('--mc_samples', type=int, default=None, help="MC-dropout samples (run's eval)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status."""
  args = _parser().parse_args(argv)
  orbax_noise.quiet_abandoned_orbax_work()  # One error line for a damaged checkpoint.
  workdir, source, out_dir = (paths.absolute(p) for p in (args.workdir, args.input,
                                                           args.output))
  try:
    files = find_inputs(source)
    if any(os.path.dirname(os.path.realpath(f)) == os.path.realpath(out_dir) for f in files):
      raise config_io.ConfigError(f'-o {out_dir}: the output folder holds the input scans, '
                                  'whose names the outputs take; choose another folder')
    predictor = load_predictor(
        workdir, checkpoint=args.checkpoint, uncertainty=args.uncertainty,
        probabilities=args.probabilities, batch_size=args.batch_size, overlap=args.overlap,
        mc_samples=args.mc_samples)
  except config_io.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_REFUSED
  skipped = predict_files(predictor, files, out_dir)
  print(f'wrote {len(files) - len(skipped)} of {len(files)} scan(s) to {out_dir}'
        + (f'; skipped {len(skipped)}' if skipped else ''), flush=True)
  return EXIT_SKIPPED if skipped else EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
