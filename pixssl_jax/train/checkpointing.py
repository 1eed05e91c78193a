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

import re
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy
from etils import epath

from pixssl_jax.train import config_checks

DAMAGED_DIR = 'damaged_checkpoints'  # Beside `checkpoints/`, out of the manager's sight.
# Where the first line of a TensorStore error turns into its (very long) spec.
_NOISE = re.compile(r' \[tensorstore_spec|\.? See full TensorStore details')
_REASON_CHARS = 240


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


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


def open_reader(directory: epath.PathLike) -> ocp.CheckpointManager:
  """A manager that only reads a checkpoint directory: creates, cleans and deletes nothing.

  For reading checkpoints without saving (evaluation, a pre-trained backbone); a directory
  that does not exist reads as one without checkpoints. Not Orbax's `read_only`, which logs a
  warning for each option it sets: without a preservation policy, temporary-directory cleanup
  or `create`, a manager that never saves changes nothing.
  """
  return ocp.CheckpointManager(epath.Path(directory),
                               options=ocp.CheckpointManagerOptions(create=False),
                               item_names=('state', 'data', 'meta'))


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
  return manager.save(step, args=args, force=force, metrics=metrics)


def saved_metrics(manager: ocp.CheckpointManager, step: int) -> dict[str, float] | None:
  """The `metrics` given to `save` for `step` (None if none were).

  Read from the checkpoint's own `meta` item: the manager only reports metrics when built
  with a `best_fn`, which the preservation policy does not need.
  """
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  return meta.get('metrics')


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding placeholders: restoring onto them reshards to today's devices."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def step_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """The folder of checkpoint `step` (Orbax's default step names: the bare number)."""
  return epath.Path(manager.directory) / str(step)


def short_reason(error: BaseException) -> str:
  """`ExceptionClass: first line` of an error's root cause, without TensorStore's spec dump.

  The root (`raise ... from`) is what names the problem: Orbax wraps a truncated file's
  `OUT_OF_RANGE: ... byte range ... is not valid` in a bare "error while reading array index".
  """
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  first = _NOISE.split(lines[0])[0].strip() if lines else ''
  if len(first) > _REASON_CHARS:
    first = first[:_REASON_CHARS - 3] + '...'
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


def _quiet_closed_loop_errors() -> None:
  """Drops the "Event loop is closed" errors that a failed restore leaves behind.

  When one array of a restore fails (a missing manifest), Orbax's event loop closes while
  TensorStore still completes the reads in flight; each completion then tries to wake the
  closed loop, and Python prints that RuntimeError's traceback through `sys.unraisablehook`,
  dozens of times, during the restore and after it has returned. They say nothing the warning
  does not; every other unraisable error still goes to the hook this one wraps. Installed
  before the first restore, once, for the rest of the process, since the errors come late.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'pixssl_quiet', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  hook.pixssl_quiet = True
  sys.unraisablehook = hook


def _warn_to_stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _all_processes_succeeded(ok: bool) -> bool:
  """Whether every process restored; they must agree on the step or the run diverges."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves step `step` into `damaged_checkpoints/` beside the checkpoint directory.

  Left in `checkpoints/`, the damaged step would make Orbax refuse to save that step again
  (the resumed run reaches it) and, being the newest, would count as one of the kept
  checkpoints while intact older ones were deleted. Process 0 moves it; all processes then
  re-read the directory.
  """
  source = step_path(manager, step)
  root = epath.Path(manager.directory).parent / DAMAGED_DIR
  target, n = root / str(step), 1
  while target.exists():  # The same step may have been damaged before.
    n += 1
    target = root / f'{step}.{n}'
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'pixssl_set_aside_{step}')
  manager.reload()
  return target


def newest_restorable(manager: ocp.CheckpointManager, restore_fn: Callable[[int], Any], *,
                      set_aside: bool,
                      advice: str = 'delete the damaged step folders to start again from step '
                                    '0, or use a fresh --workdir',
                      warn: Callable[[str], None] | None = None) -> tuple[Any, int] | None:
  """`restore_fn(step)` of the newest step that restores, trying older ones on failure.

  Args:
    manager: the checkpoint manager.
    restore_fn: restores one step; any exception it raises marks that step unreadable.
    set_aside: move each unreadable step newer than the restored one into
      `damaged_checkpoints/` (a run that will save again); False leaves the directory as it is
      (reading another run's checkpoints).
    advice: what to do when no step restores, for the error.
    warn: receives one line per unreadable step once a step has restored (process 0 only);
      default: stderr.

  Returns:
    (restore_fn's result, step), or None when the directory has no checkpoint.

  Raises:
    ConfigError: no step restores; one line per step with its reason.
  """
  warn = warn or _warn_to_stderr
  _quiet_closed_loop_errors()
  failed = []  # (step, reason) of each unreadable step, newest first.
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      result, reason = restore_fn(step), None
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise bare Exception, ValueError, OSError, JSONDecodeError...
      # for a damaged step; what they have in common is only that the step cannot be used.
      result, reason = None, short_reason(e)
    if not _all_processes_succeeded(reason is None):
      failed.append((step, reason or 'unreadable on another process'))
      continue
    for bad, why in failed:
      path = step_path(manager, bad)
      if set_aside:
        moved = _set_aside(manager, bad)
        outcome = f'moved it to {moved} and resumed from step {step}'
      else:
        outcome = f'using step {step} instead'
      if jax.process_index() == 0:
        warn(f'warning: checkpoint step {bad} cannot be restored ({path}: {why}); {outcome}.')
    return result, step
  if not failed:
    return None
  raise config_checks.ConfigError(
      f'no checkpoint in {manager.directory} can be restored:\n'
      + ''.join(f'  - step {bad} ({step_path(manager, bad)}): {why}\n' for bad, why in failed)
      + f'If the config or the code changed since they were written, run with the ones that '
        f'wrote them; if the files are damaged, {advice}.')


def restore_exact(manager: ocp.CheckpointManager, restore_fn: Callable[[int], Any], step: int,
                  *, choose: str) -> Any:
  """`restore_fn(step)` of one named step: no fallback, a ConfigError naming it on failure.

  Args:
    choose: how the user picks another step, for the error (e.g. a config flag).
  """
  _quiet_closed_loop_errors()
  try:
    return restore_fn(step)
  except Exception as e:  # pylint: disable=broad-except
    others = sorted(s for s in manager.all_steps() if s != step)
    raise config_checks.ConfigError(
        f'checkpoint step {step} cannot be restored ({step_path(manager, step)}: '
        f'{short_reason(e)}). Choose another with {choose} (other steps: {others or "none"}), '
        'or delete the damaged step folder.') from None


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
