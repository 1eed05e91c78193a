"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint at step k holds: the TrainState after k steps (student, teacher, optimizer, step),
the grain iterator state after k batches, and a small JSON item (`meta`) with the process count
the iterator state belongs to. Randomness is folded from (seed, step), so nothing else is
needed to replay a run exactly.

Resuming takes the newest checkpoint that restores: a damaged newer one (a truncated or
missing file, an empty metadata file) is reported in one warning line and moved out of the
checkpoint directory into `WORKDIR/damaged_checkpoints/`, where it stays for inspection and no
longer counts for retention nor blocks the resumed run from saving that step again.
"""

from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

# Reading checkpoints lives below train/ (evaluation and prediction read them too); these
# names are re-exported for the training code.
from pixssl_jax.rundir.checkpoints import DAMAGED_DIR  # pylint: disable=unused-import
from pixssl_jax.rundir.checkpoints import abstract_like
from pixssl_jax.rundir.checkpoints import checkpoint_dir
from pixssl_jax.rundir.checkpoints import newest_restorable
from pixssl_jax.rundir.checkpoints import open_reader  # pylint: disable=unused-import
from pixssl_jax.rundir.checkpoints import restore_exact
from pixssl_jax.rundir.checkpoints import saved_metrics  # pylint: disable=unused-import
from pixssl_jax.rundir.checkpoints import short_reason  # pylint: disable=unused-import
from pixssl_jax.rundir.checkpoints import step_path  # pylint: disable=unused-import
from pixssl_jax.train import save_errors


def make_manager(workdir: str, *, keep: int, best_metric: str | None = None,
                 best_mode: str = 'max', async_save: bool = True) -> ocp.CheckpointManager:
  """A manager over `WORKDIR/checkpoints` keeping the last `keep` checkpoints (plus the best).

  Saves are asynchronous (the loop only waits for the device-to-host copy) and atomic: Orbax
  writes into a temporary directory and renames it when complete, so a crash mid-save leaves the
  previous checkpoint as the latest usable one.

  Args:
    workdir: the run directory.
    keep: how many of the latest checkpoints to keep.
    best_metric: if set, the checkpoint with the best value of this metric (passed to `save`)
      is kept too, however old.
    best_mode: 'max' or 'min', what "best" means for `best_metric`.
    async_save: write in a background thread.
  """
  policy = preservation_policy.LatestN(keep)
  if best_metric is not None:
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policy = preservation_policy.AnyPreservationPolicy([policy, preservation_policy.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      preservation_policy=policy)
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                  item_names=('state', 'data', 'meta'))
  _await_tmp_cleanup(manager)
  return manager


def _await_tmp_cleanup(manager: ocp.CheckpointManager) -> None:
  """Waits for the removal of unfinished saves that Orbax starts in a thread at construction.

  Orbax itself only waits for it in the first `save`. A run that ends before saving (a config
  error, a checkpoint that does not restore) would otherwise exit with the thread still
  running, and it prints a RuntimeError traceback at interpreter shutdown. The method is
  private; without it (another Orbax) the wait is skipped.
  """
  wait = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
  if callable(wait):
    wait()


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         *, force: bool = False, metrics: dict[str, float] | None = None) -> bool:
  """Saves state, iterator position and metadata as step `step` (all processes call this).

  `metrics` (host floats) are what a manager with `best_metric` ranks checkpoints by; they
  are kept in the `meta` item too (`saved_metrics`).
  """
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave({'step': int(step), 'process_count': jax.process_count(),
                              'metrics': metrics}))
  # A failed write (of this save or the one in flight) comes back as one-line SaveError.
  return save_errors.save(manager, step, args=args, force=force, metrics=metrics)


def restore_latest(manager: ocp.CheckpointManager, state_template: Any,
                   data_iterator: Any | None, step: int | None = None, *,
                   warn: Callable[[str], None] | None = None,
                   choose: str = 'another step') -> tuple[Any, int, bool] | None:
  """Restores the newest checkpoint that restores (or exactly `step`), if any.

  A newest checkpoint that does not restore is set aside with one warning line and the next
  older one is tried (`newest_restorable`); a given `step` is restored or the run stops.

  Args:
    manager: from `make_manager` (or `open_reader` with `step`).
    state_template: a state (or abstract state) with today's shardings; the checkpoint is
      restored into these shardings whatever topology wrote it.
    data_iterator: the freshly built grain iterator; its position is restored in place when the
      checkpoint was written by the same number of processes. None restores the model only.
    step: restore this step, no fallback.
    warn: receives the warning lines (default: stderr).
    choose: with `step`, how the user picks another one, for the error.

  Returns:
    None when there is no checkpoint; else (state, step, data_restored).

  Raises:
    ConfigError: no checkpoint restores, or `step` does not.
  """
  target = abstract_like(state_template)

  def restore(s):
    meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    # Grain iterator state is per process count (PITFALLS): on another topology only the
    # model state comes back and the caller rebuilds the data stream.
    restore_data = (data_iterator is not None
                    and meta.get('process_count') == jax.process_count())
    items = {'state': ocp.args.StandardRestore(target)}
    if restore_data:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(s, args=ocp.args.Composite(**items))['state'], restore_data

  if step is not None:
    state, data_restored = restore_exact(manager, restore, step, choose=choose)
    return state, step, data_restored
  found = newest_restorable(manager, restore, set_aside=True, warn=warn)
  if found is None:
    return None
  (state, data_restored), step = found
  return state, step, data_restored
