"""`--config.mode=evaluate`: scoring a fine-tuned network on whole volumes.

Evaluation scores `config.eval.split` ('test') the way a paper reports it: each prediction is
resampled to the case's original grid and written as NIfTI with the original affine, then
compared with the raw label file, with the original voxel spacing for HD95 (docs/evaluation.md).
Validation during fine-tuning (`train.finetune.validation_scores`) scores the 'val' cases on the
store grid, the cheap way, with the same `inference.VolumeScorer`.

Every process scores its share of the cases (round-robin) on its first local device; process 0
merges the rows and writes `metrics.csv`/`metrics.json`.

The run describes itself: its `config.json` gives every field the command line does not state,
so `python -m pixssl_jax.evaluation.evaluate --workdir RUN` (console script `pixssl-evaluate`)
needs nothing else, and `python -m pixssl_jax.main --config configs/finetune.py:PRESET
--workdir RUN --config.mode=evaluate` need not repeat the fine-tuning overrides.
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
from etils import epath
from jax.experimental import multihost_utils

from pixssl_jax import config_files
from pixssl_jax import config_loading
from pixssl_jax import paths
from pixssl_jax import workdir_lock
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.evaluation import export
from pixssl_jax.evaluation import inference
from pixssl_jax.evaluation import metrics as metrics_lib
from pixssl_jax.rundir import checkpoints
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks
from pixssl_jax.rundir import orbax_noise
from pixssl_jax.rundir import run_record

FINETUNE_MODES = ('finetune', 'evaluate')


def _raw_label(store: case_store.CaseStore, case_id: str) -> np.ndarray | None:
  """The case's label as stored in the raw dataset, or None where the raw file is not found."""
  raw_dir, label_file = store.raw_dir, store.meta(case_id)['label_file']
  if raw_dir is None or not label_file:
    return None
  path = os.path.join(raw_dir, label_file)
  if not os.path.exists(path):
    return None
  return np.rint(np.asarray(nib.load(path).dataobj, np.float64)).astype(np.int32)


def choose_checkpoint(manager, which) -> int:
  """The step of `config.eval.checkpoint`: 'best' (highest val Dice), 'last', or a step."""
  return checkpoints.choose_step(manager, which)


def _preset_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  try:
    return config_files.load('finetune', config.get('preset'))
  except (ValueError, FileNotFoundError):
    return None  # Not a preset of configs/finetune.py: every field counts as stated.


def run_config(workdir: str, config: ml_collections.ConfigDict | None = None,
               overrides: dict | None = None,
               command_line: Sequence[tuple[str, str | None]] = ()) -> ml_collections.ConfigDict:
  """The config an evaluation of `workdir` uses: the run's own, with the stated fields on top.

  Args:
    workdir: a fine-tuning run.
    config: a full fine-tuning config (preset + overrides, as `main` passes it), or None. The
      fields where it differs from its preset are taken as stated; the others come from the
      run's `config.json`, so fine-tuning overrides need not be repeated.
    overrides: dotted fields to set, instead of those derived from `config`.
    command_line: `--config.FIELD=VALUE` pairs as typed (`config_loading.split_overrides`),
      each parsed as its field's own type, as `main` parses them, after `overrides`.

  Returns:
    The merged config with mode 'evaluate'; `config` itself where the workdir holds no
    `config.json` yet (nothing fine-tuned there: the checkpoint check says so).
  """
  if not (epath.Path(workdir) / config_io.CONFIG_FILE).exists() and config is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.head_level is None:
      config.model.head_level = 0  # Nothing was fine-tuned: the checkpoint check says so.
    return config
  written = config_io.read_config(workdir, what='--workdir')
  if written.get('mode') not in FINETUNE_MODES or written.model.get('head_level') is None:
    raise config_io.ConfigError(
        f'{workdir} holds no fine-tuning run ({workdir}/config.json is from a '
        f'{written.get("mode")!r} run); evaluate the --workdir that --config.mode=finetune '
        'wrote.')
  if overrides is None:
    overrides = {} if config is None else config_io.stated_fields(config,
                                                                  _preset_defaults(config))
  overrides = {k: v for k, v in overrides.items() if k not in ('mode', 'preset')}
  merged = config_io.apply_overrides(written, overrides)
  for field, raw in command_line:
    config_loading.apply_override(merged, field, raw)
  merged.mode = 'evaluate'
  return merged


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, print_fn=print,
             overrides: dict | None = None,
             command_line: Sequence[tuple[str, str | None]] = ()) -> list[dict]:
  """`--config.mode=evaluate`: predictions, NIfTI export and metrics of `config.eval.split`.

  The run's own `config.json` gives every field not stated (`run_config`).

  Returns:
    The summary rows (one per organ, then 'mean'); process 0 also wrote
    `WORKDIR/metrics.csv`, `WORKDIR/metrics.json` and `WORKDIR/predictions/`.
  """
  workdir = paths.absolute(workdir)
  config = paths.with_absolute_paths(run_config(workdir, config, overrides, command_line))
  problems = config_io.eval_problems(config)
  if problems:
    raise config_io.ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  store = case_store.CaseStore(config_io.resolve_data_dir(config.data))
  model = networks.segmentation_model(config, len(store.label_names))
  params, step = networks.restore_segmentation_params(workdir, config, model,
                                                      config.eval.checkpoint)
  print_fn(f'Evaluating checkpoint {step} ({config.eval.checkpoint}) on split '
           f'{config.eval.split!r} of {store.data_dir}')

  scorer = inference.VolumeScorer(model, config, uncertainty=config.eval.uncertainty)
  out_dir = os.path.join(workdir, 'predictions')
  rows, grids = [], set()
  cases = pipeline.volume_iterator(store, config.eval.split, shard_index=jax.process_index(),
                                   shard_count=jax.process_count())
  for example in cases:
    start = time.perf_counter()
    case_id, meta = example['case_id'], example['meta']
    labels, uncertainty = scorer.predict(params, example['image'])
    # The prediction on the original grid: what is written and, against the raw label, scored.
    original = export.labels_on_original_grid(labels, meta, case_id)
    if config.eval.export:
      export.save_case(meta, case_id, original, out_dir, uncertainty)
    raw_label = _raw_label(store, case_id) if 'label' in example else None
    if raw_label is not None:
      scores = metrics_lib.case_metrics(original, raw_label, meta['original_spacing'],
                                        store.label_names)
      grids.add('original')
    elif 'label' in example:  # Raw files gone: the store grid and spacing.
      scores = metrics_lib.case_metrics(labels, example['label'], store.spacing,
                                        store.label_names)
      grids.add('store')
    else:
      print_fn(f'  {case_id}: no label, prediction only')
      continue
    case_rows = metrics_lib.case_rows(case_id, scores)
    rows += case_rows
    dices = [r['dice'] for r in case_rows if r['status'] != metrics_lib.STATUS_EXCLUDED]
    print_fn(f'  {case_id}: mean Dice {100 * np.mean(dices):.1f}% '
             f'({time.perf_counter() - start:.1f} s)')
  rows, grids = _gather_rows(rows, grids, workdir)
  summary = metrics_lib.summarize(rows) if rows else []
  if jax.process_index() == 0:
    if not rows:
      print_fn(f'No labelled case in split {config.eval.split!r}: predictions written, no '
               'metrics.')
      return []
    info = {'checkpoint_step': step, 'checkpoint': str(config.eval.checkpoint),
            'split': config.eval.split, 'grid': sorted(grids), 'data_dir': store.data_dir,
            'hd95': 'MONAI definition, mm (docs/evaluation.md)'}
    metrics_lib.write_metrics(workdir, rows, summary, extra=info)
    print_fn(metrics_lib.format_table(summary))
    print_fn(f'Wrote {os.path.join(workdir, "metrics.csv")} and metrics.json'
             + (f'; predictions in {out_dir}' if config.eval.export else ''))
  return summary


def _gather_rows(rows: list[dict], grids: set, workdir: str) -> tuple[list[dict], set]:
  """All processes' rows on process 0, through small files in the (shared) workdir."""
  if jax.process_count() == 1:
    return rows, grids
  part = epath.Path(workdir) / f'.eval_rows.{jax.process_index()}.json'
  part.write_text(json.dumps({'rows': rows, 'grids': sorted(grids)}))
  multihost_utils.sync_global_devices('pixssl_eval_rows')
  if jax.process_index() != 0:
    return rows, grids
  all_rows, all_grids = [], set()
  for p in range(jax.process_count()):
    path = epath.Path(workdir) / f'.eval_rows.{p}.json'
    payload = json.loads(path.read_text())
    all_rows += payload['rows']
    all_grids |= set(payload['grids'])
    path.unlink()
  return all_rows, all_grids


def main(argv=None) -> int:
  """`python -m pixssl_jax.evaluation.evaluate --workdir RUN [--config.FIELD=VALUE ...]`.

  Evaluates a fine-tuning run with its own config; each `--config.FIELD=VALUE` overrides one
  field, parsed as that field's own type (as `pixssl-train` parses it). Returns the exit status
  (2: a config error or a workdir another job holds).
  """
  parser = argparse.ArgumentParser(prog='pixssl-evaluate',
                                   description=main.__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a fine-tuning run directory')
  rest, command_line = config_loading.split_overrides(
      list(sys.argv[1:] if argv is None else argv))
  args = parser.parse_args(rest)
  orbax_noise.quiet_abandoned_orbax_work()  # One error line for a damaged checkpoint.
  workdir = paths.absolute(args.workdir)
  try:
    # It writes predictions and metrics into the run: one writer at a time, as under `main`.
    with workdir_lock.held(workdir):
      evaluate(None, workdir, command_line=command_line)
  except (config_io.ConfigError, config_loading.ConfigLoadError,
          workdir_lock.WorkdirLocked) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
