"""Reading a run's Orbax checkpoints: which steps exist, which restore, which one to use.

A checkpoint at step k is a folder `WORKDIR/checkpoints/k/` with the items `state` (the train
state), `data` (the grain iterator position) and `meta` (JSON: step, process count, metrics).
Readers take the newest step that restores, or exactly the step they name; a damaged newer step
is reported in one warning line, and a run that will save again (`set_aside=True`) moves it
into `WORKDIR/damaged_checkpoints/`, where it no longer counts for retention nor blocks the
resumed run from saving that step again. Writing checkpoints is `train/checkpointing.py`.
"""

import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pixssl_jax.rundir.config_io import ConfigError

DAMAGED_DIR = 'damaged_checkpoints'  # Beside `checkpoints/`, out of the manager's sight.
# Where the first line of a TensorStore error turns into its (very long) spec.
_NOISE = re.compile(r' \[tensorstore_spec|\.? See full TensorStore details')
_REASON_CHARS = 240


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


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
  raise ConfigError(
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
    raise ConfigError(
        f'checkpoint step {step} cannot be restored ({step_path(manager, step)}: '
        f'{short_reason(e)}). Choose another with {choose} (other steps: {others or "none"}), '
        'or delete the damaged step folder.') from None


def choose_step(manager: ocp.CheckpointManager, which, *, field: str = 'config.eval.checkpoint',
                metric: str = 'val_dice',
                none_hint: str = 'fine-tune first (same command with --config.mode=finetune)'
                ) -> int:
  """The step `which` names: 'best' (highest saved `metric`), 'last', or a step number.

  'best' falls back to the newest step when no step saved the metric (or none reads).
  """
  steps = sorted(manager.all_steps())
  where = manager.directory
  if not steps:
    raise ConfigError(f'no checkpoint in {where}: {none_hint}')
  if which == 'last':
    return steps[-1]
  if which == 'best':
    scored = [(m[metric], s) for s in steps
              if (m := _readable_metrics(manager, s)) and m.get(metric) is not None]
    return max(scored)[1] if scored else steps[-1]
  try:
    step = int(which)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={which!r}: use 'best', 'last' or a step number") from None
  if step not in steps:
    raise ConfigError(f'{field}={step}: no such checkpoint in {where} (have {steps})')
  return step


def _readable_metrics(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The saved metrics of `step`; None, with a warning line, when its `meta` does not read."""
  try:
    return saved_metrics(manager, step)
  except Exception as e:  # pylint: disable=broad-except
    # A damaged step cannot be the best; say so instead of ranking without it in silence.
    _warn_to_stderr(f'warning: checkpoint step {step} left out of the choice of the best: its '
                    f'metrics do not read ({step_path(manager, step)}: {short_reason(e)}).')
    return None


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any,
                   step: int | None = None, *, device: jax.Device | None = None,
                   choose: str = 'another step',
                   advice: str = 'use a run whose checkpoints are intact') -> tuple[Any, int]:
  """The `params` of a checkpoint's train state, on one device; nothing else is read.

  Args:
    manager: from `open_reader`.
    abstract_params: the params tree's shapes and dtypes (`jax.eval_shape` of an init).
    step: the step, restored or a ConfigError naming it; None takes the newest that restores
      (a newer one that does not is named in a warning line and left in place).
    device: where they go; None is this process's first local device.
    choose: with `step`, how the user picks another one, for the error.
    advice: without `step`, what to do when no step restores, for the error.

  Returns:
    (params on `device`, step), whatever topology wrote the checkpoint.
  """
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  target = {'params': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)}

  def restore(s):
    # The train state's other fields (optimizer moments, a teacher) stay on disk: the same
    # on-disk format as StandardSave, restored partially.
    restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return restored['state']['params']

  if step is not None:
    return restore_exact(manager, restore, step, choose=choose), step
  found = newest_restorable(manager, restore, set_aside=False, advice=advice)
  if found is None:
    raise ConfigError(f'no checkpoint in {manager.directory}')
  return found
