"""`--config.mode=evaluate`: scoring a fine-tuned network on whole volumes.

Evaluation scores `config.eval.split` ('test') the way a paper reports it: each prediction is
resampled to the case's original grid and written as NIfTI with the original affine, then
compared with the raw label file, with the original voxel spacing for HD95 (docs/evaluation.md).
Validation during fine-tuning (`train.finetune.validation_scores`) scores the 'val' cases on the
store grid, the cheap way, with the same `inference.VolumeScorer`.

Every process scores its share of the cases (round-robin) on its first local device; process 0
merges the rows and writes `metrics.csv`/`metrics.json`.
"""

import json
import os
import sys
import time

import jax
import ml_collections
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pixssl_jax import paths
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.evaluation import export
from pixssl_jax.evaluation import inference
from pixssl_jax.evaluation import metrics as metrics_lib
from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune
from pixssl_jax.train import loop


def _raw_label(store: case_store.CaseStore, case_id: str) -> np.ndarray | None:
  """The case's label as stored in the raw dataset, or None where the raw file is not found."""
  raw_dir, label_file = store.raw_dir, store.meta(case_id)['label_file']
  if raw_dir is None or not label_file:
    return None
  path = os.path.join(raw_dir, label_file)
  if not os.path.exists(path):
    return None
  return np.rint(np.asarray(nib.load(path).dataobj, np.float64)).astype(np.int32)


def _readable_metrics(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The saved metrics of `step`; None, with a warning line, when its `meta` does not read."""
  try:
    return checkpointing.saved_metrics(manager, step)
  except Exception as e:  # pylint: disable=broad-except
    # A damaged step cannot be the best; say so instead of ranking without it in silence.
    print(f'warning: checkpoint step {step} left out of the choice of the best: its metrics '
          f'do not read ({checkpointing.step_path(manager, step)}: '
          f'{checkpointing.short_reason(e)}).', file=sys.stderr, flush=True)
    return None


def choose_checkpoint(manager: ocp.CheckpointManager, which) -> int:
  """The step of `config.eval.checkpoint`: 'best' (highest val Dice), 'last', or a step."""
  steps = sorted(manager.all_steps())
  where = manager.directory
  if not steps:
    raise config_checks.ConfigError(f'no checkpoint in {where}: fine-tune first '
                                    '(same command with --config.mode=finetune)')
  if which == 'last':
    return steps[-1]
  if which == 'best':
    scored = [(m['val_dice'], s) for s in steps
              if (m := _readable_metrics(manager, s)) and m.get('val_dice') is not None]
    return max(scored)[1] if scored else steps[-1]
  try:
    step = int(which)
  except (TypeError, ValueError):
    raise config_checks.ConfigError(
        f"config.eval.checkpoint={which!r}: use 'best', 'last' or a step number") from None
  if step not in steps:
    raise config_checks.ConfigError(f'config.eval.checkpoint={step}: no such checkpoint in '
                                    f'{where} (have {steps})')
  return step


def evaluate(config: ml_collections.ConfigDict, workdir: str, print_fn=print) -> list[dict]:
  """`--config.mode=evaluate`: predictions, NIfTI export and metrics of `config.eval.split`.

  Returns:
    The summary rows (one per organ, then 'mean'); process 0 also wrote
    `WORKDIR/metrics.csv`, `WORKDIR/metrics.json` and `WORKDIR/predictions/`.
  """
  config, workdir = paths.with_absolute_paths(config), paths.absolute(workdir)
  config_checks.validate_finetune(config, workdir)
  config = finetune.resolve(config, workdir)
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  model = finetune.build_model(config, store)
  tx = finetune.make_optimizer(config)
  # Read-only: evaluation neither creates, cleans nor deletes checkpoints.
  manager = checkpointing.open_reader(checkpointing.checkpoint_dir(workdir))
  step = choose_checkpoint(manager, config.eval.checkpoint)
  # The chosen step or a clear error: scoring another checkpoint than asked would mislead.
  state, _, _ = checkpointing.restore_latest(
      manager, finetune.abstract_state(model, tx, config), None, step=step,
      choose='--config.eval.checkpoint=STEP')
  manager.close()
  params = inference.local_copy(state.params)
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

